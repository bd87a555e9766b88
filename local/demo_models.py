"""Tiny random-weight SDXL, WAN 2.1 (T2V + VACE) and Qwen2.5 models in their real on-disk formats.

    python -m local.demo_models --out DIR [--only sdxl|wan|qwen ...]

Everything is built locally (no hub, no downloads), deterministically (fixed seeds, tokenizers trained on a
built-in corpus), so every production loading path runs unchanged on CPU in seconds:

    DIR/sdxl/              StableDiffusionXLPipeline folder (also the SDXL_CONFIG_PATH of the single file)
    DIR/sdxl.safetensors   the same SDXL as one checkpoint in the original Stability (ldm) key layout
    DIR/wan/               WanPipeline folder          DIR/wan-vace/       WanVACEPipeline folder
    DIR/qwen-instruct/     Qwen2ForCausalLM + tokenizer (ChatML, eos <|im_end|>)
    DIR/qwen-base/         Qwen2ForCausalLM + tokenizer (eos <|endoftext|>)

Each folder gets MARKER written last (built in a temporary folder, then renamed into place); a complete one
is skipped, so building again is a fast no-op. Architecture notes (the real models' configs
are mirrored at the sizes below):
- SDXL text encoders have different hidden sizes (32 vs 64) like the real ones (768 vs 1280): diffusers'
  single-file loader tells the two CLIPs apart by that width. text_encoder_2 has 10 layers so the checkpoint
  holds `conditioner.embedders.1.model.transformer.resblocks.9.*`, the key diffusers uses to detect SDXL base.
- The VAEs keep the real scale factors (SDXL 8; WAN 8 spatial / 4 temporal), so VACE's 96 input channels hold.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from local.demo_checkpoint import sdxl_to_single_file

SEED = 1234
BUILD_VERSION = "1"
MARKER = ".demo-model-complete"
GROUPS = ("sdxl", "wan", "qwen")

CORPUS = """a cat sitting on a red chair, high quality photo, detailed fur
a dog running in the park at sunset, cinematic lighting, 4k
portrait of a woman with long hair, studio lighting, sharp focus, 85mm
a futuristic city at night with neon lights and flying cars
a bowl of fruit on a wooden table, still life painting, oil on canvas
a mountain landscape with a lake and snow, golden hour, wide angle
an astronaut riding a horse on the moon, digital art, trending
a small boat on the ocean during a storm, dramatic waves and clouds
close-up of a flower with water drops, macro photography, bokeh
a cozy living room with a fireplace, warm colors, interior design
the quick brown fox jumps over the lazy dog. The camera slowly pans left.
a man walking through a forest in the rain, slow motion video, fog
ugly, blurry, low quality, deformed, watermark, text, bad anatomy, extra fingers
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
system user assistant: Hello! How can I help you today? Please describe the image in detail.
Enhance this prompt for a video model: make it vivid, specific and visual. Answer with the prompt only.
0123456789 !"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz
""".splitlines()

# Qwen2.5's chat template (the tool-calling branch left out): ChatML with Qwen's default system prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The scheduler configs of the real SDXL base and WAN 2.1 checkpoints, verbatim.
SDXL_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                  "timestep_spacing": "leading", "interpolation_type": "linear"}
WAN_SCHEDULER = {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                 "flow_shift": 5.0, "solver_order": 2}


# --------------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte alphabet in CLIP's vocabulary order: printable bytes as themselves, the rest from U+0100."""
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return [chr(c) for c in shown] + [chr(256 + i) for i in range(256 - len(shown))]


def _words(backend, suffix: str = "") -> Counter:
    """Corpus word counts, split exactly as `backend` (a tokenizers.Tokenizer) pre-tokenizes."""
    words: Counter = Counter()
    for line in CORPUS:
        text = backend.normalizer.normalize_str(line) if backend.normalizer else line
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            words[tuple(piece[:-1]) + (piece[-1] + suffix,)] += 1
    return words


def _learn_bpe(words: Counter, max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent pair first, ties broken by the pair itself, so it is deterministic:
    the `tokenizers` trainer breaks ties by hash order and differs from run to run)."""
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                hit = word[i:i + 2] == best
                out.append(word[i] + word[i + 1] if hit else word[i])
                i += 2 if hit else 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _clip_tokenizer(pad_token: str):
    """CLIP BPE laid out like openai/clip-vit-large-patch14's vocabulary:
    bytes, bytes + </w>, merges, <|startoftext|>, <|endoftext|> (the last id: CLIP pools at the argmax id)."""
    from transformers import CLIPTokenizer

    merges = _learn_bpe(_words(CLIPTokenizer().backend_tokenizer, "</w>"), 400)  # CLIP's own pre-tokenizer
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token=pad_token,
                         model_max_length=77)


def _umt5_tokenizer():
    """SentencePiece-style Unigram in T5's layout (<pad>=0, </s>=1, <unk>=2), as T5Tokenizer (umt5-xxl's class).
    Pieces: every character plus the frequent substrings of the corpus words, scored by log frequency (the
    seed vocabulary of SentencePiece's unigram trainer)."""
    from transformers import T5Tokenizer

    counts: Counter = Counter()
    for word, n in _words(T5Tokenizer(extra_ids=0).backend_tokenizer).items():
        word = "".join(word)
        for i in range(len(word)):
            for j in range(i + 1, min(i + 8, len(word)) + 1):
                counts[word[i:j]] += n
    chars = sorted(k for k in counts if len(k) == 1)
    pieces = chars + sorted((k for k in counts if len(k) > 1 and counts[k] > 1), key=lambda k: (-counts[k], k))[:400]
    total = sum(counts[p] for p in pieces)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, math.log(counts[p] / total)) for p in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _qwen_tokenizer(eos_token: str):
    """Byte-level BPE trained with Qwen2's exact pipeline; special tokens after the vocabulary like Qwen's."""
    from transformers import Qwen2Tokenizer

    merges = _learn_bpe(_words(Qwen2Tokenizer().backend_tokenizer), 400)
    tokens = _bytes_to_unicode() + ["".join(m) for m in merges]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, eos_token=eos_token,
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                         model_max_length=32768)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------------------------- SDXL
def _sdxl_pipeline():
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok1, tok2 = _clip_tokenizer("<|endoftext|>"), _clip_tokenizer("!")  # pads as in the real SDXL repo
    common = dict(vocab_size=len(tok1), max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  layer_norm_eps=1e-5, num_attention_heads=4)
    torch.manual_seed(SEED)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       hidden_act="quick_gelu", projection_dim=32, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=10,
                                                     hidden_act="gelu", projection_dim=32, **common))
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=32 + 64,  # both text encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 micro-conditioning values + text_encoder_2 projection
        norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))


# --------------------------------------------------------------------------------------------- WAN
def _wan_parts():
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tok = _umt5_tokenizer()
    torch.manual_seed(SEED + 10)
    te = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    return dict(tokenizer=tok, text_encoder=te, vae=vae, scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER))


def _wan_pipeline(vace: bool):
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel, WanVACEPipeline, WanVACETransformer3DModel

    parts = _wan_parts()
    torch.manual_seed(SEED + 20)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
               text_dim=parts["text_encoder"].config.d_model, freq_dim=256, ffn_dim=32, num_layers=2,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    if vace:  # 96 = 2 x 16 latent channels (inactive/reactive video) + 8 x 8 mask pixels per latent
        return WanVACEPipeline(transformer=WanVACETransformer3DModel(vace_layers=[0, 1], vace_in_channels=96, **cfg),
                               **parts)
    return WanPipeline(transformer=WanTransformer3DModel(**cfg), **parts)


# --------------------------------------------------------------------------------------------- Qwen
def _qwen(instruct: bool):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = _qwen_tokenizer("<|im_end|>" if instruct else "<|endoftext|>")
    eot, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(SEED + (30 if instruct else 40))
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        hidden_act="silu", tie_word_embeddings=False, sliding_window=131072, use_sliding_window=False,
        bos_token_id=eot, eos_token_id=im_end if instruct else eot, pad_token_id=eot))
    if instruct:  # as Qwen2.5-7B-Instruct's generation_config.json
        gen = GenerationConfig(bos_token_id=eot, pad_token_id=eot, eos_token_id=[im_end, eot], do_sample=True,
                               repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)
    else:  # as Qwen2.5-7B's
        gen = GenerationConfig(bos_token_id=eot, eos_token_id=eot, do_sample=False, max_new_tokens=2048)
    model.generation_config = gen
    return model, tok


# --------------------------------------------------------------------------------------------- build
def is_complete(path: Path) -> bool:
    try:
        return (Path(path) / MARKER).read_text().strip() == BUILD_VERSION
    except OSError:
        return False


def _publish(save, dest: Path) -> None:
    """Run save(tmp_dir), write the marker last, then move the folder into place."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    (tmp / MARKER).write_text(BUILD_VERSION + "\n")
    if dest.exists() and not is_complete(dest):
        shutil.rmtree(dest)
    try:
        os.rename(tmp, dest)
    except OSError:  # a concurrent builder finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(dest):
            raise


def build(out: Path, only: set[str] | None = None) -> dict[str, Path]:
    """Build (or find complete) the demo models under `out`; returns name -> path for the requested groups:
    sdxl, sdxl_single_file, wan, wan_vace, qwen_instruct, qwen_base."""
    out = Path(out)
    groups = set(GROUPS if not only else only)
    if groups - set(GROUPS):
        raise ValueError(f"unknown model group(s) {sorted(groups - set(GROUPS))}; expected {GROUPS}")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if "sdxl" in groups:
        paths.update(sdxl=out / "sdxl", sdxl_single_file=out / "sdxl.safetensors")
        pipe = None
        if not is_complete(paths["sdxl"]):
            pipe = _sdxl_pipeline()
            _publish(pipe.save_pretrained, paths["sdxl"])
        if pipe is not None or not paths["sdxl_single_file"].is_file():  # the file follows the folder
            if pipe is None:
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_pretrained(paths["sdxl"])
            sdxl_to_single_file(pipe, paths["sdxl_single_file"])
    if "wan" in groups:
        paths.update(wan=out / "wan", wan_vace=out / "wan-vace")
        for key, vace in (("wan", False), ("wan_vace", True)):
            if not is_complete(paths[key]):
                _publish(_wan_pipeline(vace).save_pretrained, paths[key])
    if "qwen" in groups:
        paths.update(qwen_instruct=out / "qwen-instruct", qwen_base=out / "qwen-base")
        for key, instruct in (("qwen_instruct", True), ("qwen_base", False)):
            if not is_complete(paths[key]):
                model, tok = _qwen(instruct)
                _publish(lambda d: (model.save_pretrained(d), tok.save_pretrained(d)), paths[key])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.demo_models", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--only", action="append", choices=GROUPS, help="build only this group (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Writing model shards" bars
    start = time.monotonic()
    for name, path in build(args.out, set(args.only) if args.only else None).items():
        print(f"{name}\t{path}")
    print(f"done in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

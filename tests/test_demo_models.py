"""The tiny demo models load through the production loading paths and run (64x64, 2 steps, 5 frames)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below must load without the hub

import numpy as np
import pytest
import torch
from PIL import Image

from local import demo_models
from local.demo_models import MARKER, build

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(height=64, width=64, num_inference_steps=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="module")
def sdxl(built):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(built["sdxl"])


@pytest.fixture(scope="module")
def wan(built):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(built["wan"])


def test_layout(built):
    assert set(built) == {"sdxl", "sdxl_single_file", "wan", "wan_vace", "qwen_instruct", "qwen_base"}
    for name, path in built.items():
        assert path.is_file() if name == "sdxl_single_file" else (path / MARKER).is_file(), name
    assert build(built["sdxl"].parent, {"qwen"}) == {k: v for k, v in built.items() if k.startswith("qwen")}
    with pytest.raises(ValueError):
        build(built["sdxl"].parent, {"flux"})


def test_sdxl_text_to_image_and_img2img_share_weights(sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    # CLIP layout: <|endoftext|> is the last id (pooled output = argmax), tokenizer_2 pads with "!" (id 0)
    assert sdxl.tokenizer.eos_token_id == len(sdxl.tokenizer) - 1 and sdxl.tokenizer_2.pad_token_id == 0
    image = sdxl("a cat", **SMALL, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    assert img2img.unet is sdxl.unet and img2img.vae is sdxl.vae and img2img.text_encoder_2 is sdxl.text_encoder_2
    assert img2img("a dog", image=image, strength=0.6, num_inference_steps=2).images[0].size == (64, 64)


def test_sdxl_single_file_matches_folder(built, sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(str(built["sdxl_single_file"]))
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    # SDXL_CONFIG_PATH needs configs + tokenizers only: drop the weights, so every tensor must come from the file
    config = tmp_path / "sdxl-config"
    shutil.copytree(built["sdxl"], config, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = StableDiffusionXLPipeline.from_single_file(str(built["sdxl_single_file"]), config=str(config))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(sdxl, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    a, b = (p("a cat", **SMALL, generator=torch.Generator().manual_seed(1), output_type="np").images
            for p in (sdxl, pipe))
    np.testing.assert_array_equal(a, b)


def test_wan_text_to_video(wan):
    frames = wan(prompt="a cat", num_frames=5, output_type="np", **SMALL).frames
    assert frames.shape == (1, 5, 64, 64, 3) and np.isfinite(frames).all()


def test_wan_vace_reference_image(built, wan):
    from diffusers import WanVACEPipeline

    vace = WanVACEPipeline.from_pretrained(built["wan_vace"])
    # WanVACEPipeline 0.42.1 calls ftfy unguarded for text prompts (see test below): encode with the T2V pipeline,
    # whose text encoder and tokenizer are the same.
    embeds, negative = wan.encode_prompt("a cat", do_classifier_free_guidance=True, max_sequence_length=512)
    video = [Image.new("RGB", (64, 64), (128, 128, 128))] * 5
    mask = [Image.new("L", (64, 64), 255)] * 5
    reference = Image.new("RGB", (64, 64), (200, 40, 40))
    frames = vace(prompt_embeds=embeds, negative_prompt_embeds=negative, video=video, mask=mask,
                  reference_images=[reference], num_frames=5, output_type="np", **SMALL).frames
    assert frames.shape == (1, 5, 64, 64, 3) and np.isfinite(frames).all()


@pytest.mark.skipif(importlib.util.find_spec("ftfy") is None,
                    reason="diffusers 0.42.1 WanVACEPipeline needs ftfy for text prompts (not installed)")
def test_wan_vace_text_prompt(built):
    from diffusers import WanVACEPipeline

    vace = WanVACEPipeline.from_pretrained(built["wan_vace"])
    frames = vace(prompt="a cat", reference_images=[Image.new("RGB", (64, 64))], num_frames=5, output_type="np",
                  **SMALL).frames
    assert frames.shape == (1, 5, 64, 64, 3)


def _qwen(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_qwen_instruct_chat(built):
    tok, model = _qwen(built["qwen_instruct"])
    assert tok.is_fast and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    default = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are Qwen") and default.endswith("user\nHi<|im_end|>\n")
    inputs = tok(text, return_tensors="pt")
    assert tok.convert_ids_to_tokens(int(inputs.input_ids[0, 0])) == "<|im_start|>"
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 4 or int(out[0, -1]) in model.generation_config.eos_token_id
    assert isinstance(tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True), str)


def test_qwen_base_generate(built):
    tok, model = _qwen(built["qwen_base"])
    assert tok.eos_token == "<|endoftext|>" == tok.pad_token
    assert model.generation_config.eos_token_id == tok.eos_token_id
    inputs = tok(["a cat", "a dog sitting"], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    _, instruct = _qwen(built["qwen_instruct"])
    assert not torch.equal(instruct.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_second_build_is_a_noop_and_builds_are_deterministic(built, tmp_path):
    out = built["sdxl"].parent
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    start = time.monotonic()
    assert build(out) == built
    assert time.monotonic() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    stale = tmp_path / "again" / "qwen-base"  # an unfinished folder (no marker) is replaced
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    build(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(out)


def test_cli(built):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "local.demo_models", "--out", str(built["sdxl"].parent), "--only", "wan",
           "--only", "qwen"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert names == ["wan", "wan_vace", "qwen_instruct", "qwen_base"]
    assert demo_models.GROUPS == ("sdxl", "wan", "qwen")

"""The chat engine on a GPU at Qwen2.5-7B size (random weights: same FLOPs and bytes as the trained model).

    python tests/chat/test_chat_gpu.py [--out report.json]   # prints a throughput report

Workloads: 512-token prompts, 256 new tokens each; one request alone, 16 submitted together, 16 arriving
one every 50 ms (continuous batching), 16 with sampling and penalties, and transformers' plain ``generate``
on the same batch as a baseline. The gpu-marked test checks that 16 concurrent requests finish in far less
than 16 times the time of one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from workers.chat.engine import Engine  # noqa: E402
from workers.chat.generation import GenerationRequest  # noqa: E402
from workers.chat.models import LoadedModel, ModelName, SingleModel  # noqa: E402
from workers.chat.sampling import SamplingParams  # noqa: E402

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-06, hidden_act="silu", tie_word_embeddings=False,
                 sliding_window=131072, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)
PROMPT, NEW, N = 512, 256, 16




def build(config: dict, device: torch.device) -> LoadedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    # no stop tokens: every request runs to max_tokens, so the work is the same in every workload
    return LoadedModel(ModelName.INSTRUCT, model, None, device, frozenset(), 8192)


def prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(n)]


def run_batch(engine: Engine, ids: list[list[int]], sampling: SamplingParams, gap: float = 0.0):
    requests = [GenerationRequest(ModelName.INSTRUCT, p, sampling) for p in ids]
    start = time.perf_counter()
    for r in requests:
        engine.submit(r)
        if gap:
            time.sleep(gap)
    results = [engine.wait(r, 600) for r in requests]
    sync(engine.store.loaded.device)
    return results, time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def report(config: dict = QWEN25_7B, prompt: int = PROMPT, new: int = NEW, n: int = N,
           device: torch.device = torch.device("cuda")) -> dict:
    loaded = build(config, device)
    engine = Engine(SingleModel(loaded), max_batch=n)
    engine.start()
    ids = prompts(config["vocab_size"], n, prompt)
    greedy = SamplingParams(temperature=0.0, max_tokens=new)
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__,
                 "prompt_tokens": prompt, "new_tokens": new, "requests": n}
    try:
        run_batch(engine, ids[:2], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        (alone,), seconds = run_batch(engine, ids[:1], greedy)
        out["one_request"] = {"seconds": round(seconds, 2), "tokens_per_s": round(new / seconds, 1)}
        for name, sampling, gap in (
                ("concurrent_greedy", greedy, 0.0),
                ("staggered_50ms_greedy", greedy, 0.05),
                ("concurrent_sampled_penalties", SamplingParams(temperature=0.7, top_p=0.9, max_tokens=new,
                                                                presence_penalty=0.5, frequency_penalty=0.5,
                                                                seed=3), 0.0)):
            steps = engine.stats()["steps"]
            results, seconds = run_batch(engine, ids, sampling, gap)
            tokens = sum(len(r.token_ids) for r in results)
            out[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                         "decode_steps": engine.stats()["steps"] - steps,
                         "ms_per_step": round(1000 * seconds / max(1, engine.stats()["steps"] - steps), 1)}
            if name == "concurrent_greedy":
                same = sum(a == b for a, b in zip(alone.token_ids, results[0].token_ids))
                out[name]["first_request_tokens_equal_to_alone"] = f"{same}/{new}"
        if device.type == "cuda":
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    finally:
        engine.stop()
    batch = torch.tensor(ids, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - start
    out["transformers_generate_batch"] = {"seconds": round(seconds, 2), "tokens_per_s": round(n * new / seconds, 1)}
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_batches_on_gpu():
    config = {**QWEN25_7B, "num_hidden_layers": 4}  # a 7B-wide slice keeps the test short
    result = report(config, prompt=256, new=64, n=8)
    print(json.dumps(result, indent=2))
    assert result["concurrent_greedy"]["tokens_per_s"] > 4 * result["one_request"]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--layers", type=int, default=QWEN25_7B["num_hidden_layers"])
    args = parser.parse_args()
    result = report({**QWEN25_7B, "num_hidden_layers": args.layers})
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

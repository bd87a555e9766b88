"""transformers' own fast paths on the chat benchmark's model and prompts, measured after our engine's rows.

- One stream: ``generate(..., cache_implementation="static")``. With a static cache transformers compiles the
  decoding forward by itself (generation/utils.py ``_valid_auto_compile_criteria``: a compileable cache on
  cuda/xpu/…; ``get_compiled_call`` with the default ``CompileConfig``: inductor, ``mode="reduce-overhead"``,
  so CUDA graphs); the prefill stays eager. One call on the same prompt and length compiles it (its seconds are
  reported); then it is measured as the eager baseline is: decode rate ``(new − 1) / (T(new) − T(1))``, and
  time to first token ``T(1)`` on the long prompts. transformers never compiles on the CPU by itself, so the
  tiny run sets ``CompileConfig._compile_all_devices`` (the flag it keeps for that) and traces with dynamo's
  eager backend (bench/peers.py ``backend``).
- All streams at once: ``generate_batch`` (generation/continuous_batching) with its defaults, which choose
  CUDA graphs, compile and async batching from the attention implementation (and switch to flash attention
  where a flash package is installed), except the KV cache: ``num_blocks`` sized for the workload instead of
  90 % of the free memory. The manager is kept between two calls: the first (other prompts of the same shape,
  so its prefix cache cannot serve the timed call) builds and warms it, the second is timed, every prompt
  submitted at once and prefill included, as ours.

Tokens are checked as ours are: equal prefix against eager ``generate`` and the tie-aware argmax gaps, judged
against ``generate``'s own gaps. Then everything is undone (the compiled call and transformers' cache-length
memo deleted, ``torch._dynamo.reset()``, the manager destroyed) and checked: eager ``generate`` gives the tokens
it gave before, and the attention implementation is the one before.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig
from transformers.generation import ContinuousBatchingConfig

from . import chat_checks, peers  # generate() and the token checks; chat.run() calls run() below
from .context import Context
from .measure import BF16_TOLERANCE, free, peak_gb, reset_peak, timed
from .streams import prompts

SECTION = "chat"
STATIC_NOTE = 'transformers generate(cache_implementation="static"), decode compiled (reduce-overhead)'
BATCH_NOTE = "transformers generate_batch (continuous batching), its defaults; KV cache sized for the workload"
MEMOS = ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_cached_continuous_batching_manager")


def run(ctx: Context, model: Any, got: dict[str, Any]) -> None:
    if "batch_prompts" not in got:
        return
    attention = model.config._attn_implementation
    prompt = got["batch_prompts"][:1]
    before = ctx.step(SECTION, "library reference call", 5, lambda: chat_checks.generate(model, prompt, 2))
    try:
        with torch._dynamo.config.patch(suppress_errors=False):   # a failed compile is an error, not eager
            ctx.step(SECTION, "library: static cache, compiled", 150, lambda: _static(ctx, model, got))
            ctx.step(SECTION, "library: generate_batch", 60, lambda: _batch(ctx, model, got))
    finally:
        undone = _undo(ctx, model)
    if undone:
        ctx.step(SECTION, "library undone", 5, lambda: _check_undone(ctx, model, got, attention, before))


def compile_config(device: torch.device) -> CompileConfig | None:
    """None on CUDA: transformers' own default. Elsewhere the flag that lets it compile at all, and the eager
    backend."""
    if device.type == "cuda":
        return None
    config = CompileConfig(backend=peers.backend(device))
    config._compile_all_devices = True
    return config


def _static(ctx: Context, model: Any, got: dict[str, Any]) -> None:
    p, dev = ctx.profile, ctx.profile.device
    prompt, config = got["batch_prompts"][:1], compile_config(dev)

    def generate(ids: list[list[int]], new: int) -> list[list[int]]:
        return chat_checks.generate(model, ids, new, cache_implementation="static", compile_config=config)

    graphs = peers.graphs_made()
    warm_s, _ = timed(lambda: generate(prompt, p.qwen_new), dev)   # the compile and the CUDA graph capture
    warm_graphs = peers.graphs_made() - graphs
    compiled = "_compiled_call" in vars(model)
    used = getattr(model, "_last_compile_config", None)
    reset_peak(dev)
    first, _ = timed(lambda: generate(prompt, 1), dev)
    full, (tokens,) = timed(lambda: generate(prompt, p.qwen_new), dev)
    rate = (p.qwen_new - 1) / (full - first)
    peak = peak_gb(dev)
    long = got.get("long_prompts", [])
    ttft = []
    if len(long) > 1:
        generate(long[:1], 1)
        ttft = [timed(lambda ids=ids: generate([ids], 1), dev)[0] for ids in long[1:]]
    eager = [got["base_alone"]] if "base_alone" in got else None
    checks = _tokens(ctx, model, "static cache, compiled", prompt, [tokens], eager, got.get("floor_alone"))
    counted = {"first_call": warm_graphs, "timed_calls": peers.graphs_made() - graphs - warm_graphs}   # > 0: recompiled
    ctx.report.detail(SECTION, "library_static", {
        "first_call_s": round(warm_s, 2), "compiled": compiled, "compile_config": used and used.to_dict(),
        "dynamo_graphs": counted,
        "decode_tok_s": round(rate, 1), "t1_s": round(first, 4), "t_new_s": round(full, 3), "peak_gb": peak,
        "ttft_s": [round(s, 4) for s in ttft], "prompt": p.qwen_prompt, "new": p.qwen_new} | checks)
    note = STATIC_NOTE + ("" if compiled else " - NOT compiled (transformers' criteria not met)")
    ctx.report.library("qwen_decode_1", round(rate, 1), note)
    ctx.report.library("qwen_decode_1_compiled", round(rate, 1), note)
    if ttft:
        ctx.report.library("qwen_ttft", round(statistics.median(ttft), 4),
                           'transformers generate(cache_implementation="static", max_new_tokens=1): prefill eager')


def _batch(ctx: Context, model: Any, got: dict[str, Any]) -> None:
    p, dev = ctx.profile, ctx.profile.device
    batch = got["batch_prompts"]
    warm_prompts = prompts(model.config.vocab_size, len(batch), p.qwen_prompt, seed=3)
    settings = ContinuousBatchingConfig()
    settings.num_blocks = 2 * len(batch) * math.ceil((p.qwen_prompt + p.qwen_new) / settings.page_size)
    config = GenerationConfig(max_new_tokens=p.qwen_new, do_sample=False)   # no eos: the library disables it

    def generate(ids: list[list[int]]) -> dict[str, Any]:
        return model.generate_batch(ids, generation_config=config, continuous_batching_config=settings,
                                    persistent_manager=True)

    try:
        first_s, _ = timed(lambda: generate(warm_prompts), dev)   # builds the manager, captures what it captures
        resolved = _resolved(getattr(model, "_cached_continuous_batching_manager", None))
        reset_peak(dev)
        wall, results = timed(lambda: generate(batch), dev)
        peak = peak_gb(dev)
    finally:
        model.destroy_cached_continuous_batching_manager()
    outputs = list(results.values())
    tokens = [o.generated_tokens for o in outputs]
    failed = [f"{o.request_id}: {o.error}" for o in outputs if o.error is not None]
    if failed or len(outputs) != len(batch):
        raise RuntimeError(f"generate_batch returned {len(outputs)} of {len(batch)} requests; failed: {failed[:3]}")
    total = sum(len(t) for t in tokens)
    checks = _tokens(ctx, model, f"generate_batch, {len(batch)} streams", batch, tokens, got.get("base_batch"),
                     got.get("floor_batch"))
    ctx.report.detail(SECTION, "library_generate_batch", {
        "first_call_s": round(first_s, 2), "wall_s": round(wall, 3), "tokens": total, "streams": len(batch),
        "tok_s": round(total / wall, 1), "peak_gb": peak, "config": resolved} | checks)
    ctx.report.library("qwen_aggregate", round(total / wall, 1), BATCH_NOTE)


def _resolved(manager: Any) -> dict[str, str]:
    """What generate_batch decided for itself (CUDA graphs, compile, async, cache size, attention)."""
    if manager is None:
        return {"manager": "not kept"}
    config = manager.continuous_batching_config
    names = ("use_cuda_graph", "use_async_batching", "varlen_compile_config", "decode_compile_config", "num_blocks",
             "max_batch_tokens", "max_blocks_per_request", "page_size", "max_memory_percent")
    out = {name: str(getattr(config, name, None)) for name in names}
    out["attention_switched_from"] = str(getattr(manager, "_original_attn_impl", None))
    return out


def _tokens(ctx: Context, model: Any, label: str, prompts_: list[list[int]], tokens: list[list[int]],
            eager: list[list[int]] | None, floor: float | None) -> dict[str, Any]:
    """Equal prefix against eager generate()'s tokens and argmax gaps, as ours are checked; the bound is the
    one ours get, from generate()'s own gaps (``floor``, bench/chat.py)."""
    new = ctx.profile.qwen_new
    prefixes = [chat_checks.equal_prefix(a, b) for a, b in zip(tokens, eager)] if eager else None
    gaps = chat_checks.argmax_gaps(model, prompts_, tokens)
    worst = max(g["max_relative_gap"] for g in gaps)
    bound = max(BF16_TOLERANCE, 1.5 * (floor or 0.0))
    lengths_ok = all(len(t) == new for t in tokens)
    ctx.report.check(f"Qwen library {label}: tokens = reference argmax within bf16", lengths_ok and worst <= bound,
                     f"worst gap {worst:.1e} of the logit scale (bound {bound:.1e}); positions not argmax "
                     f"{sum(g['positions_not_argmax'] for g in gaps)}/{len(tokens) * new}; equal prefix vs eager "
                     f"generate() (of {new}): {prefixes}; every stream {new} tokens: {lengths_ok}")
    return {"equal_prefix_vs_eager": prefixes, "argmax_gaps": gaps}


def _undo(ctx: Context, model: Any) -> bool:
    try:
        if getattr(model, "_cached_continuous_batching_manager", None) is not None:
            model.destroy_cached_continuous_batching_manager()
        for name in MEMOS:
            if name in vars(model):
                delattr(model, name)
        torch._dynamo.reset()
        free(ctx.profile.device)
        return True
    except Exception as exc:  # noqa: BLE001 - recorded; the sections after this one still run
        ctx.report.error(f"{SECTION}/library undo", exc)
        return False


def _check_undone(ctx: Context, model: Any, got: dict[str, Any], attention: str,
                  before: list[list[int]] | None) -> None:
    left = [name for name in MEMOS if name in vars(model)]
    after = chat_checks.generate(model, got["batch_prompts"][:1], 2)
    same = before is not None and after == before
    ctx.report.check("chat: library recipes undone, model as before",
                     not left and same and model.config._attn_implementation == attention,
                     f"attributes left: {left}; attention {model.config._attn_implementation!r} (before "
                     f"{attention!r}); eager generate() tokens {after} (before {before})")

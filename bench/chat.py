"""Qwen2.5-7B: the chat engine (one generation loop, continuous batching) next to transformers' eager
``generate`` on the same model, greedy, random prompt ids.

Stop tokens are off (the engine's model gets no stop ids, ``generate`` no eos) so every request makes exactly
``qwen_new`` tokens. Ours: time to first token is submit → the first ``on_tokens`` call (the loop has copied
the token to the host by then); decode rate is tokens after the first over the time after the first.
Baseline: TTFT is ``generate(max_new_tokens=1)``; decode rate ``(new − 1) / (T(new) − T(1))``.

Our engine decodes with its default step (the lean decode step, decode.py, on CUDA graphs). After the main
rows, one stream is decoded again by a one-slot engine with transformers' forward as the step (a detail: what
the lean step gained) and by one with ``CHAT_COMPILE_DECODE`` on (a row, with its compile time). Before those,
transformers' own fast paths run on the same model and prompts (bench/peers_chat.py: ``generate`` with a static,
compiled cache; ``generate_batch``), the rows' ``library`` figures.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from workers.chat.engine import Engine
from workers.chat.models import LoadedModel, ModelName, SingleModel

from . import chat_turns, models, peers_chat
from .chat_checks import argmax_gaps, equal_prefix, generate, top2_gap
from .context import Context
from .measure import BF16_TOLERANCE, free, peak_gb, reset_peak, resident_gb, sync, timed
from .report import Row
from .streams import ours, prompts

SECTION = "chat"
DECODE_TARGET, AGGREGATE_TARGET, TTFT_TARGET = 140.0, 1000.0, 0.150




def decode_path(engine: Engine) -> str:
    """How the engine decoded: "cuda_graphs", "static_eager" (slot cache, no graphs) or "dynamic_cache", and
    which step ("lean", "lean_compiled", "transformers (why)")."""
    info = engine.stats().get("decode", {}).get(ModelName.INSTRUCT.value, {})
    text = str(info.get("path", "?")) + (f", {info['forward']} step" if info.get("forward") else "")
    if info.get("compile_failure"):
        text += f" (compile failure: {info['compile_failure']})"
    return text + (f" (graph failure: {info['failure']})" if info.get("failure") else "")


def run(ctx: Context) -> None:
    p, dev = ctx.profile, ctx.profile.device
    started = time.perf_counter()
    built = ctx.step(SECTION, "build", 40, lambda: models.qwen(p))
    if built is None:
        return
    model, tokenizer = built
    ctx.report.detail(SECTION, "build_s", round(time.perf_counter() - started, 1))
    ctx.report.detail(SECTION, "parameters_m", round(models.parameters(model) / 1e6, 1))
    ctx.report.detail(SECTION, "resident_gb", resident_gb(dev))
    loaded = LoadedModel(ModelName.INSTRUCT, model, tokenizer, dev, frozenset(), 8192)
    engine = Engine(SingleModel(loaded), max_batch=max(16, p.qwen_streams))
    engine.start()
    got: dict[str, Any] = {}
    try:
        _measure(ctx, model, engine, got)
    finally:
        engine.stop()
        ctx.report.detail(SECTION, "engine_stats", engine.stats())
    engine = None  # drop the references (free the memory) before what follows
    free(dev)
    peers_chat.run(ctx, model, got)   # transformers' static-cache compile and generate_batch, same prompts
    _variants(ctx, loaded, got)
    chat_turns.run(ctx, loaded)   # next turn (prefix reuse) and a join while streams decode
    loaded = model = None  # drop the references (free the memory) before what follows
    free(dev)


def _name(p: Any) -> str:
    return "Qwen2.5-7B" if p.full else "Qwen (tiny)"


def _measure(ctx: Context, model: Any, engine: Engine, got: dict[str, Any]) -> None:
    p, dev = ctx.profile, ctx.profile.device
    vocab = model.config.vocab_size
    long_prompts = prompts(vocab, 4, p.qwen_ttft_prompt, seed=1)
    batch = prompts(vocab, p.qwen_streams, p.qwen_prompt, seed=2)
    got["batch_prompts"], got["long_prompts"] = batch, long_prompts
    name = _name(p)

    def warm_up():
        ours(engine, batch[:2], 4)
        ours(engine, long_prompts[:1], 1)
        generate(model, batch[:1], 2)
        generate(model, long_prompts[:1], 1)
    ctx.step(SECTION, "warm-up", 15, warm_up)

    def ttft():
        firsts = [ours(engine, [ids], 1)[1][0].ttft for ids in long_prompts[1:]]
        baseline = [timed(lambda ids=ids: generate(model, [ids], 1), dev)[0] for ids in long_prompts[1:]]
        ctx.report.detail(SECTION, "ttft_s", {"ours": firsts, "baseline": baseline})
        ctx.report.add(Row("qwen_ttft", f"{name} time to first token, {p.qwen_ttft_prompt}-token prompt", "s",
                           baseline=round(statistics.median(baseline), 4), ours=round(statistics.median(firsts), 4),
                           note="median of 3"), ("<=", TTFT_TARGET) if p.full else None)
    ctx.step(SECTION, "ttft", 10, ttft)

    def one_stream():
        reset_peak(dev)
        wall, (stream,), (tokens,) = ours(engine, batch[:1], p.qwen_new)
        first, _ = timed(lambda: generate(model, batch[:1], 1), dev)
        full, (base_tokens,) = timed(lambda: generate(model, batch[:1], p.qwen_new), dev)
        base_rate = (p.qwen_new - 1) / (full - first)
        got["alone"], got["base_alone"], got["base_rate"] = tokens, base_tokens, base_rate
        ctx.report.detail(SECTION, "one_stream", {"ours_wall_s": round(wall, 3), "ours_ttft_s": round(stream.ttft, 4),
                                                  "baseline_wall_s": round(full, 3), "baseline_ttft_s": round(first, 4),
                                                  "prompt": p.qwen_prompt, "new": p.qwen_new})
        ctx.report.add(Row("qwen_decode_1", f"{name} decode, 1 stream ({p.qwen_prompt}+{p.qwen_new} tokens)",
                           "tok/s", baseline=round(base_rate, 1), ours=round(stream.decode_rate, 1),
                           peak_gb=peak_gb(dev), note=f"decode: {decode_path(engine)}"),
                       (">=", DECODE_TARGET) if p.full else None)
    ctx.step(SECTION, "one stream", 30, one_stream)

    def concurrent():
        reset_peak(dev)
        wall, streams, tokens = ours(engine, batch, p.qwen_new)
        peak = peak_gb(dev)
        base_s, base_tokens = timed(lambda: generate(model, batch, p.qwen_new), dev)
        total = sum(len(t) for t in tokens)
        got["batch"], got["base_batch"] = tokens, base_tokens
        ctx.report.detail(SECTION, "concurrent", {"ours_wall_s": round(wall, 3), "baseline_s": round(base_s, 3),
                                                  "ours_ttft_s": [round(s.ttft, 3) for s in streams],
                                                  "streams": len(batch), "tokens": total})
        ctx.report.add(
            Row(
                "qwen_aggregate",
                f"{name} {len(batch)} concurrent streams, aggregate",
                "tok/s",
                baseline=round(len(batch) * p.qwen_new / base_s, 1),
                ours=round(total / wall, 1),
                peak_gb=peak,
                note=f"all submitted at once, prefill included; decode: {decode_path(engine)}",
            ),
            (">=", AGGREGATE_TARGET) if p.full else None,
        )
    ctx.step(SECTION, "concurrent", 40, concurrent)
    _check_tokens(ctx, model, batch, got)


def _check_tokens(ctx: Context, model: Any, batch: list[list[int]], got: dict[str, Any]) -> None:
    new = ctx.profile.qwen_new
    if "alone" in got:
        same = equal_prefix(got["alone"], got["base_alone"])
        detail = f"{same}/{new} tokens equal to generate() before the first difference"
        if same < new:
            detail += f"; baseline top-2 logit gap there {top2_gap(model, batch[0], got['base_alone'], same):.3f}"
        ctx.report.check("Qwen greedy tokens, 1 stream", same == new, detail)
    if "batch" in got:
        prefixes = [equal_prefix(a, b) for a, b in zip(got["batch"], got["base_batch"])]
        ctx.report.check(f"Qwen greedy tokens, {len(batch)} streams", min(prefixes) == new,
                         f"equal prefix per stream (of {new}): {prefixes}")
        if "alone" in got:
            same = equal_prefix(got["batch"][0], got["alone"])
            ctx.report.detail(SECTION, "batched_vs_alone_equal_prefix", same)
    for key, prompts_ in (("alone", batch[:1]), ("batch", batch)):
        if key not in got:
            continue
        gaps = argmax_gaps(model, prompts_, got[key] if key == "batch" else [got[key]])
        worst = max(g["max_relative_gap"] for g in gaps)
        # The noise floor: how far transformers' own generate() tokens sit from the same teacher-forced
        # reference (incremental bf16 decoding vs one full-sequence forward).
        base = argmax_gaps(model, prompts_, got[f"base_{key}"] if key == "batch" else [got["base_alone"]])
        floor = max(g["max_relative_gap"] for g in base)
        got[f"floor_{key}"] = floor
        ctx.report.detail(SECTION, f"argmax_gaps_{key}", gaps)
        ctx.report.detail(SECTION, f"argmax_gaps_generate_{key}", base)
        ctx.report.check(f"Qwen ours' tokens = reference argmax within bf16 ({len(prompts_)} stream(s))",
                         worst <= max(BF16_TOLERANCE, 1.5 * floor),
                         f"worst gap {worst:.1e} of the logit scale (generate()'s own: {floor:.1e}); positions "
                         f"not argmax {sum(g['positions_not_argmax'] for g in gaps)}/{len(prompts_) * new} "
                         f"(generate()'s own: {sum(g['positions_not_argmax'] for g in base)})")
    sync(ctx.profile.device)


def one_stream(loaded: LoadedModel, prompt: list[int], new: int, **options: Any) -> dict[str, Any]:
    """One stream on a fresh one-slot engine with ``options`` (Engine keywords): set-up seconds (slot cache,
    compile, graph capture), decode rate, tokens, and how it decoded."""
    engine = Engine(SingleModel(loaded), max_batch=1, **options)
    engine.start()
    try:
        started = time.perf_counter()
        engine.prepare(ModelName.INSTRUCT)
        prepare_s = time.perf_counter() - started
        ours(engine, [prompt], 4)
        _, (stream,), (tokens,) = ours(engine, [prompt], new)
        return {"rate": stream.decode_rate, "prepare_s": round(prepare_s, 1), "tokens": tokens,
                "decode": decode_path(engine), "info": engine.stats()["decode"].get(ModelName.INSTRUCT.value, {})}
    finally:
        engine.stop()


def _variants(ctx: Context, loaded: LoadedModel, got: dict[str, Any]) -> None:
    """1 stream with transformers' forward as the step (detail) and with CHAT_COMPILE_DECODE (row)."""
    p, dev = ctx.profile, ctx.profile.device
    if "batch_prompts" not in got:
        return
    prompt = got["batch_prompts"][0]

    def transformers_step():
        out = one_stream(loaded, prompt, p.qwen_new, lean_decode=False)
        ctx.report.detail(SECTION, "one_stream_transformers_step", {
            "tok_s": round(out["rate"], 1), "decode": out["decode"], "prepare_s": out["prepare_s"],
            "equal_prefix_vs_lean": equal_prefix(out["tokens"], got["alone"]) if "alone" in got else None})
        free(dev)
    ctx.step(SECTION, "one stream, transformers step", 20, transformers_step)

    def compiled():
        reset_peak(dev)
        out = one_stream(loaded, prompt, p.qwen_new, compile_decode=True)
        compile_s = out["info"].get("compile_seconds", {})
        ctx.report.detail(SECTION, "one_stream_compiled", {
            "tok_s": round(out["rate"], 1), "decode": out["decode"], "prepare_s": out["prepare_s"],
            "compile_seconds": compile_s,
            "equal_prefix_vs_lean": equal_prefix(out["tokens"], got["alone"]) if "alone" in got else None})
        work = f"{_name(p)} decode, 1 stream, CHAT_COMPILE_DECODE=1 (not default)"
        baseline = round(got["base_rate"], 1) if "base_rate" in got else None
        ctx.report.add(Row("qwen_decode_1_compiled", work, "tok/s", baseline=baseline,
                           ours=round(out["rate"], 1), peak_gb=peak_gb(dev),
                           note=f"set-up {out['prepare_s']} s (compile {compile_s}); decode: {out['decode']}"),
                       (">=", DECODE_TARGET) if p.full else None)
        free(dev)
    ctx.step(SECTION, "one stream, compiled step", 150, compiled)

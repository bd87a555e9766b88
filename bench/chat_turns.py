"""Chat latency where a request meets other traffic: a conversation's next turn (prefix reuse, prefix.py) and
a new request joining while 15 streams decode. Called by bench/chat.py with its model; greedy, random ids.

- **Next turn**: a conversation of ``TURN_CONTEXT`` tokens is answered (``TURN_REPLY`` tokens), then the app
  resends it with the reply and a new ``TURN_NEW``-token turn. Ours: time to first token of that resend on an
  engine with the worker's prefix cache; the same engine's first token for an unseen prompt of the same length
  (a miss) is the "without reuse" figure; the baseline is transformers' eager ``generate`` (one new token) on
  the whole resend. The first tokens of hit and miss are compared with the baseline's (same model, same math).
- **Decode ahead** (``CHAT_DECODE_AHEAD``, slot_batch.py): one stream and 16 streams decoded by an engine with
  it on (the default) and one with it off, side by side: what the host's work between two steps cost.
- **Join**: 15 streams decode; once each has a few tokens a 1,024-token request arrives. Ours: its time to
  first token; and what the join costs the others, the longest gap between two of a running stream's tokens
  around the join against their median gap. Then the same with a 6,144-token request, which the engine
  prefills in chunks of ``CHAT_PREFILL_CHUNK_TOKENS`` between decode steps (a detail).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from workers.chat.engine import Engine
from workers.chat.generation import GenerationRequest
from workers.chat.models import LoadedModel, ModelName, SingleModel
from workers.chat.sampling import SamplingParams

from .context import Context
from .measure import free, sync, timed
from .report import Row
from .streams import Stream, ours, prompts

SECTION = "chat_turns"
TURN_TARGET, JOIN_TARGET = 0.030, 0.060   # seconds (issue 17)
PREFIX_TOKENS = 32768                    # CHAT_PREFIX_CACHE_TOKENS' default
PREFILL_CHUNK = 2048                     # CHAT_PREFILL_CHUNK_TOKENS' default


def sizes(full: bool) -> dict[str, int]:
    if full:
        return {"context": 4000, "reply": 32, "new": 60, "streams": 15, "stream_prompt": 512, "after": 16,
                "join_prompt": 1024, "long_prompt": 6144, "turns": 3}
    return {"context": 120, "reply": 6, "new": 12, "streams": 3, "stream_prompt": 24, "after": 3,
            "join_prompt": 48, "long_prompt": 100, "turns": 2}


def first_token(engine: Engine, ids: list[int], max_tokens: int = 1) -> tuple[float, list[int]]:
    stream = Stream()
    request = GenerationRequest(ModelName.INSTRUCT, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                on_tokens=stream)
    stream.submitted = time.perf_counter()
    engine.submit(request)
    result = engine.wait(request, 600)
    return stream.ttft, result.token_ids


def run(ctx: Context, loaded: LoadedModel) -> None:
    s = sizes(ctx.profile.full)
    engine = Engine(SingleModel(loaded), max_batch=16, prefix_cache_tokens=PREFIX_TOKENS,
                    prefill_chunk=PREFILL_CHUNK if ctx.profile.full else 32)
    engine.start()
    try:
        ctx.step(SECTION, "next turn", 40, lambda: _next_turn(ctx, loaded, engine, s))
        ctx.step(SECTION, "join", 40, lambda: _join(ctx, engine, s))
        ctx.step(SECTION, "long join, chunked", 40, lambda: _join(ctx, engine, {**s, "join_prompt": s["long_prompt"]},
                                                                 row=False))
    finally:
        engine.stop()
        ctx.report.detail(SECTION, "engine_stats", engine.stats())
    engine = None
    free(ctx.profile.device)
    ctx.step(SECTION, "decode ahead on/off", 30, lambda: _ahead(ctx, loaded))


def _ahead(ctx: Context, loaded: LoadedModel) -> None:
    p = ctx.profile
    batch = prompts(loaded.model.config.vocab_size, p.qwen_streams, p.qwen_prompt, seed=60)
    got: dict[bool, dict[str, Any]] = {}
    for ahead in (False, True):
        engine = Engine(SingleModel(loaded), max_batch=max(16, p.qwen_streams), decode_ahead=ahead)
        engine.start()
        try:
            engine.prepare(ModelName.INSTRUCT)
            ours(engine, batch[:1], 4)                                         # warm-up
            _, (alone,), (tokens,) = ours(engine, batch[:1], p.qwen_new)
            wall, _, many = ours(engine, batch, p.qwen_new)
            info = engine.stats()["decode"][ModelName.INSTRUCT.value].get("decode_ahead")
        finally:
            engine.stop()
        got[ahead] = {"one_tok_s": alone.decode_rate, "aggregate_tok_s": sum(map(len, many)) / wall,
                      "tokens": tokens, "batch_tokens": many, "steps": info}
        engine = None
        free(p.device)
    off, on = got[False], got[True]
    ctx.report.detail(SECTION, "decode_ahead", {str(k): {n: v for n, v in g.items() if "tokens" not in n}
                                                for k, g in got.items()})
    name = "Qwen2.5-7B" if p.full else "Qwen (tiny)"
    ctx.report.add(Row("qwen_decode_1_ahead", f"{name} decode, 1 stream: decode ahead on (ours) vs off (baseline)",
                       "tok/s", baseline=round(off["one_tok_s"], 1), ours=round(on["one_tok_s"], 1)))
    ctx.report.add(Row("qwen_aggregate_ahead", f"{name} {len(batch)} streams: decode ahead on (ours) vs off "
                                               "(baseline)", "tok/s", baseline=round(off["aggregate_tok_s"], 1),
                       ours=round(on["aggregate_tok_s"], 1)))
    ctx.report.check("decode ahead: the same tokens as without it", on["tokens"] == off["tokens"]
                     and on["batch_tokens"] == off["batch_tokens"], f"steps launched ahead: {on['steps']}")


def _next_turn(ctx: Context, loaded: LoadedModel, engine: Engine, s: dict[str, int]) -> None:
    vocab, dev = loaded.model.config.vocab_size, ctx.profile.device
    first_token(engine, prompts(vocab, 1, s["context"] + s["new"], seed=30)[0])   # warm-up at this length
    hits, misses, base, agree = [], [], [], []
    for turn in range(s["turns"]):
        context, new, unseen = (prompts(vocab, 1, n, seed=40 + 3 * turn + k)[0]
                                for k, n in enumerate((s["context"], s["new"], s["context"] + s["reply"] + s["new"])))
        _, reply = first_token(engine, context, s["reply"])          # the turn the app already had answered
        resend = context + reply + new
        hit_s, hit_tokens = first_token(engine, resend)
        miss_s, _ = first_token(engine, unseen[:len(resend)])
        base_s, base_tokens = timed(lambda r=resend: _generate_one(loaded.model, r), dev)
        hits.append(hit_s), misses.append(miss_s), base.append(base_s)
        agree.append(hit_tokens[:1] == base_tokens[:1])
    prefix = engine.stats()["decode"][ModelName.INSTRUCT.value].get("prefix_cache") or {}
    ctx.report.detail(SECTION, "next_turn", {"hit_s": hits, "miss_s": misses, "generate_s": base,
                                             "first_token_equal_to_generate": agree, "prefix_cache": prefix,
                                             "resend_tokens": s["context"] + s["reply"] + s["new"]})
    label = (f"chat next turn: {s['context']:,}-token conversation + {s['reply']}-token reply + {s['new']}-token "
             "turn, first token")
    ctx.report.add(Row("chat_next_turn_ttft", label, "s", baseline=round(statistics.median(base), 4),
                       ours=round(statistics.median(hits), 4),
                       note=f"prefix cache; a miss of the same length {statistics.median(misses) * 1e3:.1f} ms"),
                   ("<=", TURN_TARGET) if ctx.profile.full else None)
    ctx.report.check("chat next turn: first token equals generate()'s", all(agree), f"{agree}")


def _generate_one(model: Any, ids: list[int]) -> list[int]:
    tensor = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=1, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _join(ctx: Context, engine: Engine, s: dict[str, int], row: bool = True) -> None:
    vocab = engine.store.get(ModelName.INSTRUCT).model.config.vocab_size
    dev = ctx.profile.device
    first_token(engine, prompts(vocab, 1, s["join_prompt"], seed=50)[0])          # warm-up at this length
    streams = [Stream() for _ in range(s["streams"])]
    requests = [GenerationRequest(ModelName.INSTRUCT, ids, SamplingParams(temperature=0.0, max_tokens=10_000),
                                  on_tokens=stream)
                for ids, stream in zip(prompts(vocab, s["streams"], s["stream_prompt"], seed=51), streams)]
    for request in requests:
        engine.submit(request)
    try:
        deadline = time.monotonic() + 120
        while any(not st.marks or st.marks[-1][1] < s["after"] for st in streams) and time.monotonic() < deadline:
            time.sleep(0.001)
        joined_at = time.perf_counter()
        ttft, _ = first_token(engine, prompts(vocab, 1, s["join_prompt"], seed=52)[0])
        time.sleep(0.2 if ctx.profile.full else 0.05)
    finally:
        for request in requests:
            request.cancel()
        sync(dev)
    gaps, around = [], []
    for stream in streams:
        times = [t for t, _ in stream.marks]
        steps = [b - a for a, b in zip(times, times[1:])]
        gaps += steps
        around += [b - a for a, b in zip(times, times[1:]) if b >= joined_at and a <= joined_at + ttft]
    median_gap = statistics.median(gaps) if gaps else None
    stall = max(around) if around else None
    ctx.report.detail(SECTION, f"join_{s['join_prompt']}", {
        "ttft_s": ttft, "chunk": engine.prefill_chunk, "median_gap_s": median_gap, "longest_gap_around_join_s": stall,
        "streams": s["streams"], "prompt": s["join_prompt"]})
    if not row:
        return
    ctx.report.add(Row("chat_join_ttft", f"chat: first token of a {s['join_prompt']:,}-token request while "
                                         f"{s['streams']} streams decode", "s", ours=round(ttft, 4),
                       note=(f"the others' longest gap {stall * 1e3:.1f} ms vs median {median_gap * 1e3:.1f} ms"
                             if stall and median_gap else "")),
                   ("<=", JOIN_TARGET) if ctx.profile.full else None)

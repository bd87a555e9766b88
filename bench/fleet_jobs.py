"""Bursts of real work through the fleet: queue jobs pushed as the app's producer pushes them (the
``["{json}"]`` element on ``sdxl_queue`` / ``wan_queue`` / ``chat_queue``) plus concurrent ``POST /chat``
calls, all started at once; then per-family throughput, latencies and the exactly-once check.

A family's *span* is from the burst's start to its last terminal callback (or HTTP answer); its rates are
units over the span: SDXL images/s, WAN frames/s and jobs/s, chat generated tokens/s (HTTP and queue
together). Latency is push → terminal callback arrival (or the HTTP call's duration).
"""
from __future__ import annotations

import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import requests

from common import keys
from local.supabase_standin import SupabaseStandin

FAMILIES = ("sdxl", "wan", "chat")
QUEUES = {"sdxl": "sdxl_queue", "wan": "wan_queue", "chat": "chat_queue"}
USER = "bench-fleet"
TERMINAL = ("completed", "failed")


@dataclass(frozen=True)
class Sizes:
    """What differs between the full run and ``--tiny``: the sizes of the work."""
    sdxl_resolution: str = "1024x1024"
    sdxl_steps: int | None = None      # None: the tier's default (fast: 15)
    wan_size: str = "832*480"
    wan_steps: int | None = None       # None: the tier's default (fast: 25)
    video_frames: int = 81
    chat_tokens: int = 128

    @classmethod
    def tiny(cls) -> Sizes:
        return cls("64x64", 2, "64*48", 2, 5, 8)


@dataclass(frozen=True)
class Spec:
    family: str
    label: str
    units: int                          # images (SDXL), frames (WAN); chat counts tokens from the answer
    job: dict[str, Any] | None = None   # a queue job (type, prompt, config)
    http: dict[str, Any] | None = None  # a POST /chat body


@dataclass
class Outcome:
    family: str
    label: str
    job_id: str
    via: str                            # queue | http
    status: str = "pending"             # completed | failed | pending | HTTP status
    latency_s: float | None = None
    terminal_callbacks: int = 0
    units: int = 0
    tokens: int = 0
    generation_time: float | None = None
    error: str = ""
    finished_at: float | None = field(default=None, repr=False)


def sdxl_specs(sizes: Sizes, batches: list[int]) -> list[Spec]:
    specs = []
    for n, batch in enumerate(batches):
        config: dict[str, Any] = {"resolution": sizes.sdxl_resolution, "num_images": batch, "seed": 100 + n}
        if sizes.sdxl_steps:
            config["num_inference_steps"] = sizes.sdxl_steps
        specs.append(Spec("sdxl", f"sdxl_image_fast x{batch}", batch,
                          {"type": "sdxl_image_fast", "prompt": f"a lighthouse at dusk, study {n}",
                           "config": config}))
    return specs


def wan_specs(sizes: Sizes, images: int, videos: int) -> list[Spec]:
    def config(n: int, **extra: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"size": sizes.wan_size, "seed": 200 + n, **extra}
        if sizes.wan_steps:
            base["num_inference_steps"] = sizes.wan_steps
        return base
    specs = [Spec("wan", "image_fast", 1, {"type": "image_fast", "prompt": f"a red fox in snow {n}",
                                           "config": config(n)}) for n in range(images)]
    specs += [Spec("wan", f"video_fast {sizes.video_frames} frames", sizes.video_frames,
                   {"type": "video_fast", "job_type": "wan_video_fast", "prompt": f"waves on a beach {n}",
                    "config": config(50 + n, frame_num=sizes.video_frames)}) for n in range(videos)]
    return specs


def chat_specs(sizes: Sizes, http: int, jobs: int) -> list[Spec]:
    def messages(n: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Tell me a long story about a lighthouse keeper, number {n}."}]
    specs = [Spec("chat", "POST /chat", 0, http={"messages": messages(n), "max_tokens": sizes.chat_tokens,
                                                 "temperature": 0.7}) for n in range(http)]
    specs += [Spec("chat", "chat_conversation job", 0,
                   {"type": "chat_conversation", "prompt": "",
                    "config": {"messages": messages(100 + n), "max_tokens": sizes.chat_tokens}})
              for n in range(jobs)]
    return specs


def element(job_id: str, job: dict[str, Any]) -> str:
    return json.dumps([json.dumps({"id": job_id, "user_id": USER, "metadata": {}, **job})])


def _chat_call(session: requests.Session, url: str, key: str, body: dict, outcome: Outcome, t0: float) -> None:
    try:
        answer = session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        data = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
        outcome.status = "completed" if answer.status_code == 200 and data.get("success") else str(answer.status_code)
        outcome.tokens = int(data.get("tokens_generated") or 0)
        outcome.generation_time = data.get("generation_time")
        if outcome.status != "completed":
            outcome.error = str(data.get("error") or answer.text[:200])
    except (requests.RequestException, ValueError) as exc:
        outcome.status, outcome.error = "error", type(exc).__name__
    outcome.finished_at = time.time()
    outcome.latency_s = round(outcome.finished_at - t0, 3)


def run_burst(client: redis.Redis, standin: SupabaseStandin, chat_url: str, chat_key: str, specs: list[Spec],
              timeout: float) -> tuple[list[Outcome], float]:
    """Push every queue job and start every HTTP call at once; wait for all to finish (or ``timeout``).
    Returns the outcomes and the burst's start time (``time.time()``)."""
    outcomes = [Outcome(s.family, s.label, f"bench-{s.family}-{uuid.uuid4().hex[:12]}",
                        "http" if s.http is not None else "queue", units=s.units) for s in specs]
    http = [(s, o) for s, o in zip(specs, outcomes) if s.http is not None]
    pool = ThreadPoolExecutor(max_workers=max(1, len(http)))
    sessions = []
    for _ in http:
        session = requests.Session()
        session.trust_env = False
        sessions.append(session)
    t0 = time.time()
    pipe = client.pipeline(transaction=False)
    for spec, outcome in zip(specs, outcomes):
        if spec.job is not None:
            pipe.rpush(QUEUES[spec.family], element(outcome.job_id, spec.job))
    pipe.execute()
    futures = [pool.submit(_chat_call, session, chat_url, chat_key, spec.http, outcome, t0)
               for session, (spec, outcome) in zip(sessions, http)]
    deadline = time.monotonic() + timeout
    queued = [o for o in outcomes if o.via == "queue"]
    while time.monotonic() < deadline:
        _collect(standin, queued, t0)
        if all(o.status in TERMINAL for o in queued) and all(f.done() for f in futures):
            break
        time.sleep(0.1)
    pool.shutdown(wait=False, cancel_futures=True)
    for session in sessions:
        session.close()
    return outcomes, t0


def _collect(standin: SupabaseStandin, queued: list[Outcome], t0: float) -> None:
    for outcome in queued:
        terminal = [c for c in standin.callbacks(outcome.job_id) if c.status in TERMINAL]
        outcome.terminal_callbacks = len(terminal)
        if not terminal or outcome.status in TERMINAL:
            continue
        first = terminal[0]
        meta = first.body.get("metadata") or {}
        outcome.status = first.status
        outcome.finished_at = first.at
        outcome.latency_s = round(first.at - t0, 3)
        outcome.generation_time = meta.get("generation_time")
        outcome.tokens = int(meta.get("tokens_generated") or 0)
        if first.status != "completed":
            outcome.error = f"{meta.get('error_type')}: {first.body.get('error_message')}"[:300]


def recount(standin: SupabaseStandin, outcomes: list[Outcome]) -> None:
    """Count terminal callbacks again (a duplicate would arrive after the first)."""
    for outcome in outcomes:
        if outcome.via == "queue":
            outcome.terminal_callbacks = len([c for c in standin.callbacks(outcome.job_id) if c.status in TERMINAL])


def drained(client: redis.Redis, timeout: float = 15.0) -> dict[str, Any]:
    """Queues, processing lists and the callback outbox, once empty (or as they are after ``timeout``)."""
    def state() -> dict[str, Any]:
        waiting = {q: client.llen(q) for q in QUEUES.values() if client.llen(q)}
        processing = {k.decode(): client.llen(k) for k in client.keys("*:processing:*") if client.llen(k)}
        dead = {q: client.llen(keys.dead(q)) for q in QUEUES.values() if client.llen(keys.dead(q))}
        return {"waiting": waiting, "processing": processing, "dead": dead, "outbox": client.hlen(keys.OUTBOX)}
    deadline = time.monotonic() + timeout
    found = state()
    while any(found.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = state()
    return found


def summarize(outcomes: list[Outcome], t0: float) -> dict[str, dict[str, Any]]:
    by_family: dict[str, dict[str, Any]] = {}
    for family in FAMILIES:
        mine = [o for o in outcomes if o.family == family]
        if not mine:
            continue
        done = [o for o in mine if o.status == "completed"]
        ends = [o.finished_at for o in done if o.finished_at is not None]
        span = max(ends) - t0 if ends else None
        latencies = [o.latency_s for o in done if o.latency_s is not None]
        gen = [o.generation_time for o in done if isinstance(o.generation_time, (int, float))]
        summary: dict[str, Any] = {
            "jobs": len(mine), "completed": len(done),
            "exactly_once": all(o.status == "completed" and (o.via == "http" or o.terminal_callbacks == 1)
                                for o in mine),
            "span_s": round(span, 3) if span else None,
            "jobs_per_s": round(len(done) / span, 3) if span else None,
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_max_s": round(max(latencies), 3) if latencies else None,
            "generation_time_mean_s": round(statistics.fmean(gen), 3) if gen else None,
        }
        units = sum(o.units for o in done)
        tokens = sum(o.tokens for o in done)
        if family == "sdxl":
            summary.update(images=units, images_per_s=round(units / span, 3) if span else None)
        elif family == "wan":
            summary.update(frames=units, frames_per_s=round(units / span, 3) if span else None)
        else:
            summary.update(tokens=tokens, tokens_per_s=round(tokens / span, 1) if span else None)
        by_family[family] = summary
    return by_family


def problems(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The outcomes that are not one completed job (for the report)."""
    return [asdict(o) for o in outcomes
            if o.status != "completed" or (o.via == "queue" and o.terminal_callbacks != 1)][:20]

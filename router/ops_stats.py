"""The numbers behind the ops page: ring buffers, percentiles, per-minute job series, chat rates, the pod.

Pure functions over plain values (no I/O but psutil's), so each is tested on its own (tests/ops).
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import psutil

BUCKET_SECONDS = 60.0
FAILED = frozenset({"failed", "invalid", "dead"})


def ring(size: int) -> deque:
    """A ring buffer: the oldest sample falls out once ``size`` are kept."""
    return deque(maxlen=max(1, size))


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def job_summary(jobs: list[dict[str, Any]], now: float, window: float) -> dict[str, Any]:
    """Per job type over ``window``: totals and latency percentiles, and one point per minute that had jobs
    (completed, failed, p50 and p95 of the completed jobs' durations). ``jobs`` are journal records."""
    start = now - window
    types: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        if job["t"] >= start:
            types.setdefault(job["type"], []).append(job)
    out = []
    for name in sorted(types):
        records = types[name]
        durations = [r["seconds"] for r in records if r["outcome"] == "completed" and r["seconds"] is not None]
        buckets: dict[float, list[dict[str, Any]]] = {}
        for r in records:
            buckets.setdefault(math.floor(r["t"] / BUCKET_SECONDS) * BUCKET_SECONDS, []).append(r)
        points = []
        for minute in sorted(buckets):
            group = buckets[minute]
            done = [r["seconds"] for r in group if r["outcome"] == "completed" and r["seconds"] is not None]
            points.append({"t": minute, "completed": sum(r["outcome"] == "completed" for r in group),
                           "failed": sum(r["outcome"] in FAILED for r in group),
                           "p50_seconds": percentile(done, 50), "p95_seconds": percentile(done, 95)})
        out.append({"type": name, "count": len(records), "completed": sum(r["outcome"] == "completed" for r in records),
                    "failed": sum(r["outcome"] in FAILED for r in records), "p50_seconds": percentile(durations, 50),
                    "p95_seconds": percentile(durations, 95), "per_minute": points})
    return {"bucket_seconds": BUCKET_SECONDS, "types": out}


@dataclass
class ChatRates:
    """Rates from the chat engine's cumulative counters (``tokens``, ``first_tokens``, ``ttft_seconds_total``):
    tokens per second and the mean time to first token since the previous sample. A counter that went down
    means the worker restarted: that sample's deltas start from zero."""

    last: tuple[float, dict[str, float]] | None = None

    def sample(self, now: float, engine: dict[str, Any]) -> tuple[int, int, float | None, float | None]:
        counters = {k: float(engine.get(k) or 0) for k in ("tokens", "first_tokens", "ttft_seconds_total")}
        tokens_per_second = ttft = None
        if self.last is not None and now > self.last[0]:
            before = self.last[1]
            delta = {k: v - before[k] if v >= before[k] else v for k, v in counters.items()}
            tokens_per_second = round(delta["tokens"] / (now - self.last[0]), 2)
            if delta["first_tokens"] > 0:
                ttft = round(delta["ttft_seconds_total"] / delta["first_tokens"], 4)
        self.last = (now, counters)
        return int(engine.get("active") or 0), int(engine.get("waiting") or 0), tokens_per_second, ttft


#: Filesystems shown, by label: the root one, and the one the fleet runs from (on a pod, often a volume).
DISKS = {"/": "/", "working directory": "."}


def pod_now(disks_by_label: dict[str, str] = DISKS) -> dict[str, Any]:
    """CPU (since the previous call), memory, and each distinct filesystem of ``disks_by_label`` (labelled,
    so that no path of the pod is shown)."""
    memory = psutil.virtual_memory()
    disks, seen = [], set()
    for label, path in disks_by_label.items():
        try:
            device = os.stat(path).st_dev
            usage = psutil.disk_usage(path)
        except OSError:
            continue
        if device in seen:
            continue
        seen.add(device)
        disks.append({"label": label, "total_bytes": usage.total, "used_bytes": usage.used,
                      "percent": usage.percent})
    return {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": psutil.cpu_count() or 1,
            "memory": {"total_bytes": memory.total, "used_bytes": memory.total - memory.available,
                       "percent": memory.percent}, "disks": disks}

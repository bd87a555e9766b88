"""The ops page's data: polled every few seconds on a thread of the router, kept for an hour in memory.

Each round asks, on loopback, the memory manager (``GET /memory/status``: per GPU memory, pressure, the
reservations), the orchestrator (``GET /status`` on ``ORCHESTRATOR_STATUS_PORT``: every program), the chat
worker (``GET /status``: its engine's counters), Redis (``ops_redis``: queue depths, the outbox, the job
journal) and psutil (the pod's CPU, memory and disks). Time series go into ring buffers of one hour; jobs are
kept from the journal for an hour and summarised per type and minute when the page asks. A source that does not
answer is shown as such, with the age of what was last heard from it: a round never fails.

Nothing a user wrote reaches the document: journal records are rebuilt field by field (``_clean``), the chat
worker's answer is reduced to its engine's numbers, and no source's document is passed through whole.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import keys

from .ops_stats import ChatRates, job_summary, pod_now, ring
from .ops_view import document

log = logging.getLogger("router.ops")

WINDOW_SECONDS = 3600.0
MAX_JOBS_KEPT = 50_000
JOURNAL_STEP = 200          # journal records read each round once caught up (all of them at first)
Source = Callable[[], Any]  # a reading, or an exception


@dataclass
class Sources:
    """Where each reading comes from; ``None`` = not configured (shown as "off")."""

    memory: Source | None = None
    utilization: Source | None = None           # {fleet GPU index: percent}, from the memory manager's metrics
    orchestrator: Source | None = None
    chat: Source | None = None
    redis: Callable[[int], Any] | None = None   # takes how many journal records to read
    pod: Source | None = pod_now


@dataclass
class _Heard:
    value: Any = None
    at: float | None = None      # wall time of the last good reading
    error: str | None = None     # the last failure, when it is newer than the last good reading


@dataclass
class Collector:
    sources: Sources
    interval: float = 5.0
    wall: Callable[[], float] = time.time
    window: float = WINDOW_SECONDS
    heard: dict[str, _Heard] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = int(self.window / max(self.interval, 0.1)) + 1
        self.gpu_history: dict[int, deque] = {}
        self.pod_history = ring(size)
        self.chat_history = ring(size)
        self.queue_history = ring(size)
        self._size = size
        self._jobs: dict[tuple, dict[str, Any]] = {}
        self._journal_read = 0            # 0 until the first full read
        self._chat = ChatRates()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the thread
    def start(self) -> Collector:
        if self._thread is None and self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="ops-collector", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.collect()
            except Exception:  # noqa: BLE001 - a bug in one round must not end the page's data
                log.exception("ops: collecting failed")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    # ------------------------------------------------------------------ one round
    def collect(self) -> None:
        """Ask every source once and record what came back."""
        now = self.wall()
        readings = {name: self._ask(name, source, now) for name, source in (
            ("memory_manager", self.sources.memory), ("gpu_utilization", self.sources.utilization),
            ("orchestrator", self.sources.orchestrator),
            ("chat", self.sources.chat), ("pod", self.sources.pod))}
        redis = self._ask("redis", self._redis_source(), now)
        with self._lock:
            self._record_gpus(now, readings["memory_manager"])
            self._record_pod(now, readings["pod"])
            self._record_chat(now, readings["chat"])
            if redis is not None:
                self._record_redis(now, redis)

    def _redis_source(self) -> Source | None:
        read = self.sources.redis
        if read is None:
            return None
        count = self._journal_read or keys.JOURNAL_MAX
        return lambda: read(count)

    def _ask(self, name: str, source: Source | None, now: float) -> Any:
        heard = self.heard.setdefault(name, _Heard())
        if source is None:
            return None
        try:
            value = source()
        except Exception as exc:  # noqa: BLE001 - any failure of a source is "unreachable", shown on the page
            if heard.error is None:
                log.warning("ops: %s did not answer (%s)", name, type(exc).__name__)
            heard.error = type(exc).__name__
            return None
        if value is None:
            heard.error = "no answer"
            return None
        if heard.error is not None and heard.at is not None:
            log.info("ops: %s answers again", name)
        heard.value, heard.at, heard.error = value, now, None
        return value

    def _record_gpus(self, now: float, memory: dict[str, Any] | None) -> None:
        if not memory:
            return
        by_worker: dict[int, dict[str, float]] = {}
        for r in memory.get("reservations", []):
            gpu = by_worker.setdefault(int(r.get("gpu", 0)), {})
            gpu[str(r.get("worker"))] = round(gpu.get(str(r.get("worker")), 0.0) + float(r.get("gb", 0.0)), 2)
        for gpu in memory.get("gpus", []):
            index = int(gpu["index"])
            history = self.gpu_history.setdefault(index, ring(self._size))
            total, free = float(gpu.get("total_gb", 0.0)), float(gpu.get("free_gb", 0.0))
            history.append((now, round(total - free, 2), round(free, 2), by_worker.get(index, {})))

    def _record_pod(self, now: float, pod: dict[str, Any] | None) -> None:
        if pod:
            self.pod_history.append((now, pod["cpu_percent"], pod["memory"]["percent"]))

    def _record_chat(self, now: float, status: dict[str, Any] | None) -> None:
        engine = ((status or {}).get("model") or {}).get("engine") if isinstance(status, dict) else None
        if isinstance(engine, dict):
            self.chat_history.append((now, *self._chat.sample(now, engine)))

    def _record_redis(self, now: float, reading: Any) -> None:
        self.queue_history.append((now, {q.name: q.waiting for q in reading.queues}))
        known = 0
        for raw in reading.journal:
            record = _clean(raw)
            if record is None:
                continue
            identity = (record["id"], record["t"], record["worker"], record["attempt"], record["outcome"])
            if identity in self._jobs:
                known += 1
            else:
                self._jobs[identity] = record
        # caught up when this read overlapped what we had; otherwise read the whole journal next round
        self._journal_read = JOURNAL_STEP if known or not reading.journal else 0
        horizon = now - self.window
        if len(self._jobs) > MAX_JOBS_KEPT or any(r["t"] < horizon for r in self._jobs.values()):
            kept = sorted((r for r in self._jobs.values() if r["t"] >= horizon), key=lambda r: r["t"])
            self._jobs = {(r["id"], r["t"], r["worker"], r["attempt"], r["outcome"]): r
                          for r in kept[-MAX_JOBS_KEPT:]}

    # ------------------------------------------------------------------ the document
    def snapshot(self) -> dict[str, Any]:
        """The ops page's JSON document (``GET /ops/data``; its schema is ``OpsData`` in common/openapi.py)."""
        with self._lock:
            return document(self, self.wall())

    def jobs(self) -> list[dict[str, Any]]:
        """The jobs of the last hour, oldest first."""
        return sorted(self._jobs.values(), key=lambda r: r["t"])

    def summary(self, now: float) -> dict[str, Any]:
        return job_summary(self.jobs(), now, self.window)


_OUTCOMES = frozenset({"completed", "failed", "invalid", "dead", "cancelled"})


def _clean(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A journal record rebuilt from its known fields only (short strings, numbers), or None if malformed."""
    def text(value: Any, limit: int = 64) -> str | None:
        return value[:limit] if isinstance(value, str) else None

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    t, outcome = number(raw.get("t")), text(raw.get("outcome"))
    if t is None or outcome not in _OUTCOMES:
        return None
    attempt = raw.get("attempt")
    return {"id": (text(raw.get("id"), 8) or ""), "type": text(raw.get("type")) or "unknown", "outcome": outcome,
            "seconds": number(raw.get("seconds")), "worker": text(raw.get("worker"), 128) or "",
            "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
            "error_type": text(raw.get("error_type")), "t": t}

"""Prometheus metrics of one worker process, in a registry of its own (no globals shared between app instances).

Names follow Prometheus' conventions: base units in the name (``_seconds``, ``_bytes``), ``_total`` on every
counter, ``worker_`` for what this process did and ``fleet_`` for shared state it samples from Redis (every
worker of a queue reports the same value: take ``max by (queue)``). The registry also holds the default
``process_*`` and ``python_*`` collectors (``common.metrics``).

- ``worker_jobs_total{job_type,outcome}``: jobs ended or skipped (completed, failed, dead, invalid,
  cancelled, retried, handed_back, claim_lost, ...);
- ``worker_job_duration_seconds{job_type,outcome}``: histogram, fetch to terminal step, per terminal outcome;
- ``worker_http_requests_total{endpoint,status}``;
- ``worker_callback_failures_total{status}``: callback attempts that failed (HTTP status or exception name);
- ``worker_callback_retries_total{reason}``, ``worker_storage_retries_total{reason}``: tries repeated after a
  failure (``reason``: ``HTTP 503``, ``ConnectTimeout``, ...);
- ``fleet_queue_jobs{queue,state}``: ``waiting``, ``processing`` and ``dead`` jobs, sampled on the heartbeat;
- ``fleet_callback_outbox_entries``: terminal callbacks owed in the outbox.

The chat worker adds its engine's (``workers/chat/engine_metrics.py``) through ``include``.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from common import keys
from common.metrics import standard_registry

JOB_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200)
QUEUE_STATES = ("waiting", "processing", "dead")


class Metrics:
    def __init__(self) -> None:
        self.registry = standard_registry()
        r = self.registry
        self.jobs = Counter("worker_jobs_total", "Jobs ended or skipped, by type and outcome",
                            ["job_type", "outcome"], registry=r)
        self.job_duration = Histogram("worker_job_duration_seconds",
                                      "Job wall time from fetch to terminal callback, by type and terminal outcome",
                                      ["job_type", "outcome"], registry=r, buckets=JOB_BUCKETS)
        self.queue_jobs = Gauge("fleet_queue_jobs", "Jobs in a queue's lists: waiting, processing, dead",
                                ["queue", "state"], registry=r)
        self.callback_failures = Counter("worker_callback_failures_total", "Callback attempts that failed",
                                         ["status"], registry=r)
        self.callback_retries = Counter("worker_callback_retries_total",
                                        "Terminal-callback tries repeated after a failure", ["reason"], registry=r)
        self.storage_retries = Counter("worker_storage_retries_total", "Storage uploads repeated after a failure",
                                       ["reason"], registry=r)
        self.outbox = Gauge("fleet_callback_outbox_entries", "Terminal callbacks owed in the outbox", registry=r)
        self.requests = Counter("worker_http_requests_total", "HTTP requests, by endpoint and status",
                                ["endpoint", "status"], registry=r)

    def include(self, source: Any) -> None:
        """Register the collectors ``source`` offers (``collectors()``, e.g. the chat handler's engine)."""
        for collector in getattr(source, "collectors", list)():
            self.registry.register(collector)

    def finished(self, job_type: str, outcome: str, seconds: float) -> None:
        """One job ended with ``outcome``: counted, and its duration observed."""
        self.jobs.labels(job_type, outcome).inc()
        self.job_duration.labels(job_type, outcome).observe(max(0.0, seconds))

    def sample_queue(self, transport: Any, queue: str) -> None:
        """Read ``queue``'s waiting, processing and dead counts from Redis (a few commands; the heartbeat calls
        it every third of its TTL). Processing: the lists of the workers registered in ``workers:active``."""
        members = [_text(m) for m in transport.command("SMEMBERS", keys.ACTIVE_WORKERS) or []]
        owners = [worker for q, worker in map(keys.parse_active_member, members) if q == queue]
        processing = sum(int(transport.command("LLEN", keys.processing(queue, w)) or 0) for w in owners)
        counts = {"waiting": int(transport.command("LLEN", queue) or 0), "processing": processing,
                  "dead": int(transport.command("LLEN", keys.dead(queue)) or 0)}
        for state, count in counts.items():
            self.queue_jobs.labels(queue, state).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Prometheus metrics of one worker process (own registry: no globals shared between app instances)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("worker_jobs_total", "Jobs finished, by type and outcome",
                            ["job_type", "outcome"], registry=self.registry)
        self.job_seconds = Histogram("worker_job_seconds", "Job wall time, fetch to terminal callback",
                                     ["job_type"], registry=self.registry,
                                     buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.queue_depth = Gauge("worker_queue_depth", "Waiting jobs (LLEN)", ["queue"], registry=self.registry)
        self.callback_failures = Counter("worker_callback_failures_total",
                                         "Callback attempts that failed", ["status"], registry=self.registry)
        self.outbox = Gauge("worker_callback_outbox", "Terminal callbacks waiting in the outbox",
                            registry=self.registry)
        self.requests = Counter("worker_http_requests_total", "HTTP requests, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

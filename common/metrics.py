"""What every process's Prometheus registry starts with.

Each process keeps a registry of its own (never the client's global one, so two apps built in one test
process do not share counters); the client registers its default collectors only on the global registry, so
they are registered again here: ``process_*`` (CPU seconds, resident memory, open file descriptors, start
time), ``python_info`` and ``python_gc_*``. Names of the fleet's own metrics follow Prometheus' conventions:
base units in the name (``_seconds``, ``_bytes``), ``_total`` on counters; ``worker_`` for what a worker
process did, ``fleet_`` for shared state (queues, the outbox, GPU reservations), ``pod_`` for the machine.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector


def standard_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry

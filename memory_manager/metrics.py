"""The memory manager's Prometheus metrics (``GET /metrics``), in a registry of its own with the default
``process_*`` and ``python_*`` collectors (``common.metrics``):

- the pod's GPUs (NVML), CPU, memory and disk: ``pod_*`` (``memory_manager/pod.py``);
- the ledger, per fleet GPU: ``fleet_gpu_memory_reserved_bytes{gpu,worker}`` (what each worker reserved),
  ``fleet_gpu_memory_available_bytes{gpu}`` (what the policy can still grant) and
  ``fleet_gpu_pressure_level{gpu}`` (0 low, 1 medium, 2 high, 3 critical);
- ``memory_manager_http_requests_total{endpoint,status}``.

Everything but the request counter is read when Prometheus scrapes: nothing runs between scrapes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import standard_registry

from .ledger import Pressure
from .pod import CGROUP, GpuCollector, PodCollector, load_nvml
from .policy import MemoryPolicy

GIB = float(1 << 30)   # the ledger's "GB" are GiB (probe.py)
PRESSURE_LEVELS = {level.value: rank for rank, level in enumerate(Pressure)}
_NOT_GIVEN: Any = object()


class LedgerCollector(Collector):
    def __init__(self, policy: MemoryPolicy):
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        status = self._policy.status()
        reserved = GaugeMetricFamily("fleet_gpu_memory_reserved_bytes", "GPU memory reserved, per worker",
                                     labels=["gpu", "worker"])
        totals: dict[tuple[str, str], float] = {}
        for reservation in status["reservations"]:
            key = (str(reservation["gpu"]), reservation["worker"])
            totals[key] = totals.get(key, 0.0) + reservation["gb"] * GIB
        for key, value in sorted(totals.items()):
            reserved.add_metric(list(key), value)
        available = GaugeMetricFamily("fleet_gpu_memory_available_bytes", "GPU memory the policy can still grant",
                                      labels=["gpu"])
        pressure = GaugeMetricFamily("fleet_gpu_pressure_level", "Memory pressure: 0 low, 1 medium, 2 high, "
                                     "3 critical", labels=["gpu"])
        for gpu in status["gpus"]:
            available.add_metric([str(gpu["index"])], gpu["available_gb"] * GIB)
            pressure.add_metric([str(gpu["index"])], PRESSURE_LEVELS.get(gpu["pressure"], 0))
        yield reserved
        yield available
        yield pressure


class MemoryMetrics:
    """What ``create_base_app`` serves on ``/metrics`` and counts requests with."""

    def __init__(self, policy: MemoryPolicy, *, nvml: Any = _NOT_GIVEN, physical: Sequence[int] | None = None,
                 cgroup: Path = CGROUP, disk_paths: Sequence[str] | None = None):
        """``nvml``: ``pynvml`` (loaded here unless given; ``None``: no GPU gauges) or a stand-in with its
        functions; ``physical``: the NVML index of each fleet GPU (``CUDA_VISIBLE_DEVICES``)."""
        self.registry = standard_registry()
        self.requests = Counter("memory_manager_http_requests_total", "HTTP requests, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.registry.register(GpuCollector(load_nvml() if nvml is _NOT_GIVEN else nvml, physical))
        self.registry.register(PodCollector(cgroup, disk_paths))
        self.registry.register(LedgerCollector(policy))

    def render(self) -> bytes:
        return generate_latest(self.registry)

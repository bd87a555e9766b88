"""The pod's hardware as Prometheus gauges, read when Prometheus scrapes the memory manager's ``/metrics``.

``GpuCollector`` (NVML, package ``nvidia-ml-py``; no CUDA context), per fleet GPU (label ``gpu``, the
memory manager's index: with ``CUDA_VISIBLE_DEVICES=2,3`` NVML device 3 is ``gpu="1"``):
``pod_gpu_memory_used_bytes``, ``pod_gpu_memory_total_bytes``, ``pod_gpu_utilization_ratio`` (0-1),
``pod_gpu_temperature_celsius``, ``pod_gpu_power_watts``. Without NVML (no driver, no GPU) they are absent,
and so is any one reading a GPU does not support.

``PodCollector`` (psutil): ``pod_cpu_percent`` (all CPUs, since the previous scrape), ``pod_memory_used_bytes``
and ``pod_memory_total_bytes``, ``pod_disk_used_bytes`` and ``pod_disk_total_bytes`` (label ``path``: the root
filesystem, and the working directory's when it is another one, e.g. a RunPod volume on ``/workspace``). In a
container, memory comes from its cgroup (``memory.current``, ``memory.max``) when it has a limit: the host's
RAM, which psutil sees, is not what the pod may use. CPU is psutil's, the host's view.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("memory_manager")

CGROUP = Path("/sys/fs/cgroup")
GPU_GAUGES = (
    ("pod_gpu_memory_used_bytes", "GPU memory in use (NVML)", lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used),
    ("pod_gpu_memory_total_bytes", "GPU memory in all (NVML)", lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).total),
    ("pod_gpu_utilization_ratio", "Share of the last sample period a kernel ran on the GPU (0-1)",
     lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
    ("pod_gpu_temperature_celsius", "GPU core temperature",
     lambda nvml, h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
    ("pod_gpu_power_watts", "GPU power draw", lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
)


def load_nvml() -> Any | None:
    """``pynvml`` initialised, or None where NVML cannot be used (the GPU gauges are then absent)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.info("metrics: NVML unavailable (%s): no GPU gauges", type(exc).__name__)
        return None


class GpuCollector(Collector):
    def __init__(self, nvml: Any | None, physical: Sequence[int] | None = None):
        """``nvml``: ``pynvml`` after ``nvmlInit`` (``load_nvml``), or an object with the same functions (tests);
        ``physical``: the NVML index of each fleet GPU (``None``: every device NVML counts)."""
        self._nvml = nvml
        self._physical = list(physical) if physical is not None else None

    def collect(self) -> Iterator[Metric]:
        if self._nvml is None:
            return
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [(str(index), nvml.nvmlDeviceGetHandleByIndex(device))
                       for index, device in enumerate(self._physical if self._physical is not None else range(count))
                       if device < count]
        except Exception as exc:  # noqa: BLE001 - NVMLError and its many subclasses (a GPU fell off the bus)
            log.warning("metrics: NVML did not answer (%s)", type(exc).__name__)
            return
        for name, doc, read in GPU_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            for gpu, handle in handles:
                try:
                    family.add_metric([gpu], float(read(nvml, handle)))
                except Exception:  # noqa: BLE001 - NVMLError_NotSupported on this GPU: the reading is absent
                    continue
            if family.samples:
                yield family


class PodCollector(Collector):
    def __init__(self, cgroup: Path = CGROUP, disk_paths: Sequence[str] | None = None):
        self._cgroup = cgroup
        self._disk_paths = list(disk_paths) if disk_paths is not None else _disk_paths()
        psutil.cpu_percent(interval=None)   # the first call only starts psutil's interval

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pod_cpu_percent", "CPU busy, all CPUs, since the previous scrape (0-100)",
                                value=psutil.cpu_percent(interval=None))
        used, total = self.memory()
        yield GaugeMetricFamily("pod_memory_used_bytes", "Memory in use by the pod", value=used)
        yield GaugeMetricFamily("pod_memory_total_bytes", "Memory the pod may use", value=total)
        disk_used = GaugeMetricFamily("pod_disk_used_bytes", "Disk space in use", labels=["path"])
        disk_total = GaugeMetricFamily("pod_disk_total_bytes", "Disk space in all", labels=["path"])
        for path in self._disk_paths:
            try:
                usage = psutil.disk_usage(path)
            except OSError:
                continue
            disk_used.add_metric([path], usage.used)
            disk_total.add_metric([path], usage.total)
        yield disk_used
        yield disk_total

    def memory(self) -> tuple[float, float]:
        """(used, total) bytes: the cgroup's usage and limit where it has one, else the machine's."""
        limit = _read_number(self._cgroup / "memory.max")
        current = _read_number(self._cgroup / "memory.current")
        if limit is not None and current is not None:
            return current, limit
        memory = psutil.virtual_memory()
        return float(memory.total - memory.available), float(memory.total)


def _read_number(path: Path) -> float | None:
    """A cgroup file's number; None when absent, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return float(text) if text.isdigit() else None


def _disk_paths() -> list[str]:
    """The root filesystem, and the working directory's if it is another (a volume mounted under it)."""
    paths = ["/"]
    cwd = os.getcwd()
    try:
        if os.stat(cwd).st_dev != os.stat("/").st_dev:
            paths.append(cwd)
    except OSError:
        pass
    return paths

"""GPU memory probes: what each GPU has in total and free right now.

- :class:`NvmlProbe`: NVML through ``pynvml`` (package ``nvidia-ml-py``) when installed: no CUDA context.
- :class:`TorchProbe`: ``torch.cuda.mem_get_info``: works wherever CUDA torch does, but creates a CUDA
  context (a few hundred MiB) on every GPU in the memory manager's process.
- :class:`FixedProbe`: a configured capacity per GPU (``MEMORY_CAPACITY_GB``), free = total, so the policy
  runs on CPU machines from the ledger alone. Tests set its free memory with :meth:`FixedProbe.set_free`.

Fleet GPU index *i* is the *i*-th device the orchestrator sees: with ``CUDA_VISIBLE_DEVICES=2,3`` inherited,
NVML device 3 is fleet GPU 1 (NVML ignores ``CUDA_VISIBLE_DEVICES``; torch applies it itself).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from .config import MemorySettings
from .ledger import GpuMemory

log = logging.getLogger("memory_manager")

GIB = float(1 << 30)


class Probe(Protocol):
    name: str

    def gpus(self) -> list[GpuMemory]: ...


class FixedProbe:
    name = "capacity"

    def __init__(self, capacity_gb: float, count: int = 1):
        self._lock = threading.Lock()
        self._gpus = [GpuMemory(i, capacity_gb, capacity_gb) for i in range(count)]

    def gpus(self) -> list[GpuMemory]:
        with self._lock:
            return list(self._gpus)

    def set_free(self, index: int, free_gb: float) -> None:
        with self._lock:
            gpu = self._gpus[index]
            self._gpus[index] = GpuMemory(index, gpu.total_gb, min(free_gb, gpu.total_gb))


class NvmlProbe:
    name = "nvml"

    def __init__(self, physical: Sequence[int] | None = None):
        import pynvml  # optional dependency: ImportError when absent

        self._nvml = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        self._physical = [i for i in (physical if physical is not None else range(count)) if i < count]

    def gpus(self) -> list[GpuMemory]:
        result = []
        for index, device in enumerate(self._physical):
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(device))
            result.append(GpuMemory(index, info.total / GIB, info.free / GIB))
        return result


class TorchProbe:
    name = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        self._cuda = torch.cuda

    def gpus(self) -> list[GpuMemory]:
        result = []
        for index in range(self._cuda.device_count()):
            free, total = self._cuda.mem_get_info(index)
            result.append(GpuMemory(index, total / GIB, free / GIB))
        return result


def physical_devices(visible: str | None) -> list[int] | None:
    """The NVML index of each fleet GPU from ``CUDA_VISIBLE_DEVICES``; None: every device, in NVML's order."""
    if visible is None or not visible.strip():
        return None
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    return [int(v) for v in entries] if all(v.isdigit() for v in entries) else None


def make_probe(settings: MemorySettings, visible_devices: str | None = None) -> Probe:
    """The best probe available (``MEMORY_PROBE=auto``: NVML, then torch, then the configured capacity)."""
    choices = {"auto": ("nvml", "torch"), "nvml": ("nvml",), "torch": ("torch",), "capacity": ()}[settings.probe]
    for choice in choices:
        try:
            probe: Probe = NvmlProbe(physical_devices(visible_devices)) if choice == "nvml" else TorchProbe()
        except Exception as exc:  # noqa: BLE001 - an optional backend may fail in many library-specific ways
            log.info("probe %s unavailable (%s)", choice, type(exc).__name__)
            continue
        if probe.gpus():
            log.info("probe: %s, %d GPU(s)", probe.name, len(probe.gpus()))
            return probe
    count = max(settings.gpu_count or 1, 1)  # no GPU at all (CPU runs): one pretend device
    log.info("probe: configured capacity %.1f GiB x %d GPU(s) (MEMORY_CAPACITY_GB)", settings.capacity_gb, count)
    return FixedProbe(settings.capacity_gb, count)

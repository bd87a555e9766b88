"""Memory manager settings (``MemorySettings.from_env(os.environ)``), parsed once at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from common.errors import ConfigError
from common.settings import Reader

from common.topology import MODEL_WORKERS, pairs

DEFAULT_SIZES_GB = {"sdxl": 10.0, "chat": 15.0, "wan": 30.0}


@dataclass(frozen=True)
class MemorySettings:
    probe: str = "auto"                  # auto | nvml | torch | capacity
    capacity_gb: float = 80.0            # per GPU, when no real probe is available (CPU machines, tests)
    gpu_count: int | None = None         # how many GPUs the capacity probe pretends (default: 1)
    critical_gb: float = 5.0             # pressure: free < critical → critical
    high_gb: float = 10.0                #           free < high → high
    medium_gb: float = 15.0              #           free < medium → medium, else low
    safety_margin_gb: float = 1.0        # kept free on every GPU when granting
    sizes_gb: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZES_GB))
    tick_seconds: float = 5.0            # pressure sample, dead-worker sweep, predictive reload
    dead_after_checks: int = 3           # a worker whose /health has not answered this many ticks is gone
    reload_quiet_seconds: float = 30.0   # an evicted worker reloads once its size has fitted this long
    history_size: int = 500
    worker_timeout_seconds: float = 120.0  # for /memory/unload and /memory/load calls

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "MemorySettings":
        r = Reader(env)
        count = r.raw("GPU_COUNT")
        settings = cls(
            probe=r.choice("MEMORY_PROBE", ("auto", "nvml", "torch", "capacity"), "auto"),
            capacity_gb=r.number("MEMORY_CAPACITY_GB", 80.0, 0.1, 100_000),
            gpu_count=None if count is None else int(r.number("GPU_COUNT", 1, 0, 64)),
            critical_gb=r.number("MEMORY_CRITICAL_GB", 5.0, 0, 10_000),
            high_gb=r.number("MEMORY_HIGH_GB", 10.0, 0, 10_000),
            medium_gb=r.number("MEMORY_MEDIUM_GB", 15.0, 0, 10_000),
            safety_margin_gb=r.number("MEMORY_SAFETY_MARGIN_GB", 1.0, 0, 10_000),
            sizes_gb={**DEFAULT_SIZES_GB, **pairs(r, "MEMORY_SIZES_GB", MODEL_WORKERS, _positive, "GB (> 0)")},
            tick_seconds=r.number("MEMORY_TICK_SECONDS", 5.0, 0.05, 3600),
            dead_after_checks=int(r.number("MEMORY_DEAD_AFTER_CHECKS", 3, 1, 1000)),
            reload_quiet_seconds=r.number("MEMORY_RELOAD_QUIET_SECONDS", 30.0, 0, 86400),
            worker_timeout_seconds=r.number("MEMORY_WORKER_TIMEOUT_SECONDS", 120.0, 1, 3600),
        )
        if not settings.critical_gb <= settings.high_gb <= settings.medium_gb:
            raise ConfigError("MEMORY_CRITICAL_GB <= MEMORY_HIGH_GB <= MEMORY_MEDIUM_GB must hold")
        return settings


def _positive(value: str) -> float:
    number = float(value)
    if not 0 < number <= 100_000:
        raise ValueError
    return number

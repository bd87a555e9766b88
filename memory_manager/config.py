"""Memory manager settings (``MemorySettings.from_env(os.environ)``), parsed once at the edge: its own policy, the
workers' ports, the admin key it calls them with and checks its callers against, the servers' read deadline."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.declare import var
from common.errors import ConfigError
from common.parsers import Parser, choice, integer, number, pairs
from common.settings import AdminKey, GpuCount, Logs, Serving
from common.topology import MODEL_WORKERS, Topology

DEFAULT_SIZES_GB = {"sdxl": 10.0, "chat": 15.0, "wan": 30.0}
_GIGABYTES = Parser(lambda v: _positive(float(v)), "GB (> 0)")


def _positive(number_: float) -> float:
    if not 0 < number_ <= 100_000:
        raise ValueError
    return number_


@dataclass(frozen=True)
class MemorySettings(Topology, AdminKey, Serving, Logs, GpuCount):
    """Memory manager"""

    probe: str = var("MEMORY_PROBE", choice("auto", "nvml", "torch", "capacity"), "auto",
                     "`nvml`, `torch` or `capacity` (no GPU: a configured size, so the policy runs anywhere)")
    capacity_gb: float = var("MEMORY_CAPACITY_GB", number(0.1, 100_000), 80.0, "per-GPU size for the `capacity` probe")
    critical_gb: float = var("MEMORY_CRITICAL_GB", number(0, 10_000), 5.0,
                             "pressure is critical with less free memory than this")
    high_gb: float = var("MEMORY_HIGH_GB", number(0, 10_000), 10.0, "pressure is high below this")
    medium_gb: float = var("MEMORY_MEDIUM_GB", number(0, 10_000), 15.0, "pressure is medium below this, else low")
    safety_margin_gb: float = var("MEMORY_SAFETY_MARGIN_GB", number(0, 10_000), 1.0,
                                  "kept free on each GPU when granting")
    sizes_gb: Mapping[str, float] = var("MEMORY_SIZES_GB", pairs(MODEL_WORKERS, _GIGABYTES, DEFAULT_SIZES_GB),
                                        DEFAULT_SIZES_GB, "reservation sizes")
    tick_seconds: float = var("MEMORY_TICK_SECONDS", number(0.05, 3600), 5.0,
                              "background checks: pressure sample, dead-worker sweep, predictive reload")
    dead_after_checks: int = var("MEMORY_DEAD_AFTER_CHECKS", integer(1, 1000), 3,
                                 "missed checks before a worker's reservations are dropped")
    reload_quiet_seconds: float = var(
        "MEMORY_RELOAD_QUIET_SECONDS", number(0, 86400), 30.0,
        "an evicted chat is reloaded once its size has fitted beside what is reserved (a busy WAN's included) on "
        "every tick for this long")
    worker_timeout_seconds: float = var("MEMORY_WORKER_TIMEOUT_SECONDS", number(1, 3600), 120.0,
                                        "timeout of unload/load calls to workers")
    history_size: int = 500

    def _check(self) -> None:
        if not self.critical_gb <= self.high_gb <= self.medium_gb:
            raise ConfigError("MEMORY_CRITICAL_GB <= MEMORY_HIGH_GB <= MEMORY_MEDIUM_GB must hold")

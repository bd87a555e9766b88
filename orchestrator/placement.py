"""GPU placement: which GPU each model worker sees (its ``CUDA_VISIBLE_DEVICES``).

- No GPU or one GPU: every worker shares it; ``CUDA_VISIBLE_DEVICES`` is inherited unchanged.
- Several GPUs: ``GPU_PLACEMENT`` (``sdxl:0,chat:1,wan:1``) names a GPU per worker; workers it does not name
  are spread round-robin in priority order (SDXL, chat, WAN) over the GPUs.

GPU indices count the GPUs the orchestrator itself sees: when the orchestrator inherits
``CUDA_VISIBLE_DEVICES=2,3``, index 0 is device 2 and index 1 is device 3.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    index: int                   # the fleet's GPU index (what the memory manager ledger counts by)
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES for the child; None = inherit


def place(workers: Sequence[str], gpu_count: int, explicit: Mapping[str, int],
          inherited_visible: str | None = None) -> dict[str, Placement]:
    """Placement of each worker in ``workers`` (given in priority order)."""
    if gpu_count <= 1:
        bad = {w: i for w, i in explicit.items() if i > 0}
        if bad:
            raise ConfigError(f"GPU_PLACEMENT names GPU {max(bad.values())} but only {max(gpu_count, 1)} "
                              "GPU is available")
        return {w: Placement(0, None) for w in workers}
    devices = _devices(inherited_visible, gpu_count)
    result: dict[str, Placement] = {}
    spread = 0
    for worker in workers:
        if worker in explicit:
            index = explicit[worker]
            if index >= gpu_count:
                raise ConfigError(f"GPU_PLACEMENT: GPU {index} for {worker} does not exist "
                                  f"({gpu_count} GPUs: 0..{gpu_count - 1})")
        else:
            index = spread % gpu_count
            spread += 1
        result[worker] = Placement(index, devices[index])
    return result


def _devices(inherited_visible: str | None, gpu_count: int) -> list[str]:
    if inherited_visible is not None and inherited_visible.strip():
        listed = [d.strip() for d in inherited_visible.split(",") if d.strip()]
        if len(listed) >= gpu_count:
            return listed[:gpu_count]
    return [str(i) for i in range(gpu_count)]

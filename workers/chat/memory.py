"""GPU memory as the chat engine sees it, and when to try a failed fast path again.

After an OOM the engine drops the failed batch and builds a new one; whether the new slot KV cache fits is
decided by ``free_bytes``. ``torch.cuda.mem_get_info`` alone undercounts: the dropped batch's blocks (its KV
cache, its graph pool) sit in PyTorch's caching allocator, reserved but unallocated, until ``empty_cache`` -
free for PyTorch, invisible to the driver. A ``Retry`` schedules the next attempt at a fast path (the slot
cache, one CUDA-graph bucket) that failed, so one bad moment never pins the slow path for good.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def free_bytes(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can use: the driver's free memory plus PyTorch's cached free blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def release(device: torch.device) -> None:
    """Collect what only reference cycles still hold, and hand cached blocks back to the driver (the other
    workers on this GPU and the memory manager's probe see the driver's numbers)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Retry:
    """The schedule of a failed fast path: the next try ``first`` seconds after the first failure, doubling
    after each further failure up to ``cap``; at most ``attempts`` tries in all (None: no limit)."""

    first: float
    cap: float
    attempts: int | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    failures: int = 0
    next_at: float = 0.0

    def failed(self) -> None:
        self.failures += 1
        self.next_at = self.clock() + min(self.cap, self.first * 2 ** (self.failures - 1))

    @property
    def due(self) -> bool:
        return (self.attempts is None or self.failures < self.attempts) and self.clock() >= self.next_at

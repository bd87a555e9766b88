"""GPU memory as the chat engine sees it: what a model needs reserved, what is free, and when to try a failed
fast path again.

After an OOM the engine drops the failed batch and builds a new one; whether the new slot KV cache fits is
decided by ``free_bytes``. ``torch.cuda.mem_get_info`` alone undercounts: the dropped batch's blocks (its KV
cache, its graph pool) sit in PyTorch's caching allocator, reserved but unallocated, until ``empty_cache`` -
free for PyTorch, invisible to the driver. A ``Retry`` schedules the next attempt at a fast path (the slot
cache, one CUDA-graph bucket) that failed, so one bad moment never pins the slow path for good.

``reservation_gb`` sizes what to ask the memory manager for before loading a model: its weights plus the
slot KV cache the engine allocates for it plus the largest prefill's working set. For Qwen2.5-7B in bf16 at
the defaults (16 slots x 8,192 tokens, 16,384-token prefills): 15.2 GB + 7.5 GB + 1.5 GB = 24.2 GB (22.6 GiB).
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import prefix
from .slots import SlotCache


def free_bytes(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can use: the driver's free memory plus PyTorch's cached free blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def reservation_gb(path: Path, dtype: torch.dtype, slots: int, max_context: int, prefill_tokens: int,
                   prefix_tokens: int = 0) -> float:
    """GiB the model in folder ``path`` occupies while the engine serves it in ``dtype``: the checkpoint's bytes
    (rescaled from its stored dtype), the slot KV cache (``slots`` x ``max_context``, capped by the model's own
    context, as ``load_model`` caps it), the prefix cache's pool of ``prefix_tokens`` (prefix.py), and a prefill
    of ``prefill_tokens`` through the widest layer (the MLP's gate and up projections, and the hidden state in and
    out). Graph pools and penalty counts are small next to
    these; the margin the memory manager keeps covers them."""
    from transformers import AutoConfig  # noqa: PLC0415 - only when sizing a load

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    stored = getattr(config, "dtype", None)
    stored_size = torch.empty(0, dtype=stored).element_size() if isinstance(stored, torch.dtype) else itemsize
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors")) * itemsize / stored_size
    context = min(max_context, getattr(config, "max_position_embeddings", None) or max_context)
    kv = SlotCache.bytes_needed(config, slots, context, dtype) + prefix.bytes_needed(config, prefix_tokens, dtype)
    prefill = prefill_tokens * (2 * config.intermediate_size + 2 * config.hidden_size) * itemsize
    return (weights + kv + prefill) / 2 ** 30


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

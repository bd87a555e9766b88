"""Timing, memory and comparison helpers shared by the sections.

Times are wall-clock around a device synchronisation on both ends (the work is whole requests, seconds
long; events would add nothing). Peak memory is ``torch.cuda.max_memory_allocated`` since the last reset,
in GB (1e9 bytes). Relative error is ``‖ours − baseline‖ / ‖baseline‖`` in float64.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")
BF16_TOLERANCE = 1e-2     # relative error of bf16/fp16 operands (METHOD.md: between 1e-3 and 1e-2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def repeat(fn: Callable[[], T], device: torch.device, times: int,
           tap: torch.nn.Module | None = None) -> tuple[float, list[float], T, torch.Tensor | None]:
    """Run ``fn`` ``times`` times; returns (median seconds, all seconds, last result, what ``tap``'s module
    received during the last run, concatenated)."""
    seconds: list[float] = []
    result: Any = None
    tapped = None
    for i in range(max(1, times)):
        if tap is not None and i == max(1, times) - 1:
            with Tap(tap) as capture:
                s, result = timed(fn, device)
            tapped = capture.value
        else:
            s, result = timed(fn, device)
        seconds.append(s)
    return statistics.median(seconds), [round(s, 4) for s in seconds], result, tapped


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


def resident_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(device) / 1e9, 2)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel_err(ours: Any, baseline: Any) -> float:
    a = _array(ours)
    b = _array(baseline)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a - b))


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def describe(value: Any) -> dict[str, Any]:
    """Shape, finiteness and spread of a tensor/array (so a check on saturated or NaN outputs shows it)."""
    a = _array(value)
    finite = bool(np.isfinite(a).all())
    return {"shape": list(a.shape), "finite": finite,
            "mean": float(np.nanmean(a)) if a.size else None, "std": float(np.nanstd(a)) if a.size else None}


class Tap:
    """Capture the first positional input of ``module`` on every call (a copy kept on the device, so no
    synchronisation inside a timed run); ``value`` concatenates the captures along dim 0."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.captured: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> Tap:
        self.captured.clear()
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.captured.append(args[0].detach().clone())

    @property
    def value(self) -> torch.Tensor:
        return torch.cat([c.float().cpu() for c in self.captured])


class Deadline:
    """Seconds left in the run; sections skip steps that would not fit."""

    def __init__(self, seconds: float):
        self.started = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, needed: float) -> bool:
        return self.left() >= needed

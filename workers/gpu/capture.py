"""Capturing one CUDA graph: warm-up calls on a side stream, the capture into a memory pool, a checked replay.

Both graph users follow this pattern (vLLM, gpt-fast, PyTorch's own CUDA-graph notes): the chat decode step
(workers/chat/graphs.py) and the module forwards of the denoisers and text encoders (graphed.py). Warm-up runs
on the side stream the capture will use, so lazy initialisation (cuBLAS workspaces, autotuning, allocator
growth) happens before recording; the capture uses ``capture_error_mode="thread_local"`` so that other threads'
CUDA calls (the HTTP threads' memory queries) do not make it fail. The first replay is compared with the last
warm-up call: the same kernels agree far closer than ``MAX_RELATIVE_ERROR`` (usually exactly), so a larger
difference means the function read something the graph does not capture.

What a caller does around it (its pool, which failures disable what, retries) stays with the caller.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

MAX_RELATIVE_ERROR = 1e-2   # replay vs eager, relative L2 over every tensor of the output tree


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    outputs: Any       # what the captured call returned; every replay overwrites these tensors in place
    expected: Any      # the last warm-up call's result (after ``snapshot``): what a replay must reproduce


def capture(fn: Callable[[], Any], *, device: torch.device, pool: Any, warm_up: int,
            snapshot: Callable[[Any], Any] | None = None) -> Captured:
    """Record ``fn()`` as a graph on ``device``: ``warm_up`` eager calls on a side stream (``snapshot``, if
    given, is applied to the last one's result there), then one call captured into ``pool`` (None: a new
    pool, ``graph.pool()`` afterwards). ``fn`` must only read and write tensors whose addresses stay fixed.
    Raises what the capture raised; the caller decides what a failure disables (see :func:`settle`)."""
    if isinstance(warm_up, bool) or not isinstance(warm_up, int) or warm_up < 1:
        raise ValueError(f"warm_up must be a positive number of calls, not {warm_up!r}")
    if not isinstance(device, torch.device) or device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device!r}")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warm_up):
            expected = fn()
        if snapshot is not None:
            expected = snapshot(expected)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        outputs = fn()
    return Captured(graph, outputs, expected)


def check_replay(captured: Captured, against: str = "the eager call",
                 max_error: float = MAX_RELATIVE_ERROR) -> None:
    """Replay once and compare with the warm-up result; ``RuntimeError`` (naming ``against``) when they differ
    by more than ``max_error`` or the error is not a number."""
    captured.graph.replay()
    error = relative_error(captured.outputs, captured.expected)
    if not error <= max_error:   # also catches NaN
        raise RuntimeError(f"graph replay differs from {against} (relative error {error:.2e})")


def relative_error(outputs: Any, expected: Any) -> float:
    """The relative L2 distance over every tensor leaf of two output trees (in fp32); inf when their tensor
    leaves do not pair up or there are none."""
    got = [t.float() for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    want = [t.float() for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if len(got) != len(want) or not want:
        return float("inf")
    diff = sum(float((g - w).norm()) ** 2 for g, w in zip(got, want)) ** 0.5
    scale = sum(float(w.norm()) ** 2 for w in want) ** 0.5
    return diff / max(scale, 1e-6)


def settle(device: torch.device) -> None:
    """Wait for ``device`` after a failed capture, so its error does not surface in the next job's kernels; a
    broken capture may leave an error behind, which is logged (the eager path will report it if it lasts)."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:
        log.warning("synchronising after a failed capture raised", exc_info=True)

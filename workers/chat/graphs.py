"""CUDA graphs of the decode step: one per (batch bucket, span bucket), captured once, replayed every step.

An eager decode step of a 7B model launches ~1,000 kernels from Python; on the benchmark host that costs
~100 ms per step whatever the batch, against ~5 ms of GPU work (bench/RESULTS.md). A graph replays the whole
step with one launch. The step reads only fixed-address tensors (the slot cache, the token and position
buffers) and its Python-side shapes are fixed per key, so a replay computes exactly what an eager call with
the same buffers would (same kernels, same math).

Capture (vLLM / gpt-fast pattern): two eager warm-up calls on a side stream, then the capture, all graphs
sharing one memory pool; the first replay is checked against the eager result. Every call of ``forward`` with
the current buffers is idempotent (it writes the same key/value at the same positions), so capturing right
before a real step is safe. Any failure disables graphs for this batch, logged once: decoding goes on eagerly.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2
MAX_RELATIVE_ERROR = 1e-2   # replay vs eager logits, relative L2; same kernels should agree far closer


class DecodeGraphs:
    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.failure: str | None = None
        self.replays = 0
        self.capture_seconds = 0.0

    @property
    def usable(self) -> bool:
        return self.failure is None

    @property
    def keys(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def run(self, key: tuple[int, int], forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's logits: a replay of ``key``'s graph (captured now if needed), or ``forward()`` eagerly
        once graphs failed. The returned tensor is overwritten by the next replay: consume it first."""
        if self.failure is not None:
            return forward()
        entry = self._graphs.get(key) or self.capture(key, forward)
        if entry is None:
            return forward()
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out

    def capture(self, key: tuple[int, int],
                forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        if self.failure is not None:
            return None
        started = time.perf_counter()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARM_UP_CALLS):
                    expected = forward()
                expected = expected.float()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                out = forward()
            graph.replay()
            error = float((out.float() - expected).norm() / expected.norm().clamp(min=1e-6))
            if not error <= MAX_RELATIVE_ERROR:   # also catches NaN
                raise RuntimeError(f"graph replay differs from the eager step (relative error {error:.2e})")
        except Exception as exc:  # noqa: BLE001 - any capture failure means: decode eagerly, never crash
            self.disable(f"{type(exc).__name__}: {exc}"[:300], key)
            return None
        self.capture_seconds += time.perf_counter() - started
        log.info("captured the decode step for batch %d, span %d in %.2f s", key[0], key[1],
                 time.perf_counter() - started)
        self._graphs[key] = (graph, out)
        return graph, out

    def disable(self, reason: str, key: tuple[int, int] | None = None) -> None:
        log.warning("CUDA graphs disabled for the chat decode step%s (decoding eagerly): %s",
                    f" (capturing batch {key[0]}, span {key[1]})" if key else "", reason)
        self.failure = reason
        self._graphs.clear()
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:  # a broken capture may leave an error behind; the eager path will report it
            log.warning("synchronising after the failed capture raised", exc_info=True)

    def describe(self) -> dict[str, object]:
        return {"graphs": [list(k) for k in self.keys], "replays": self.replays,
                "capture_seconds": round(self.capture_seconds, 2), "failure": self.failure}

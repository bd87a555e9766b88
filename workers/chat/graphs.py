"""CUDA graphs of the decode step: one per (batch bucket, span bucket), captured once, replayed every step.

An eager decode step of a 7B model launches ~1,000 kernels from Python; on the benchmark host that costs
~100 ms per step whatever the batch, against ~5 ms of GPU work (bench/RESULTS.md). A graph replays the whole
step with one launch. The step reads only fixed-address tensors (the slot cache, the token and position
buffers) and its Python-side shapes are fixed per key, so a replay computes exactly what an eager call with
the same buffers would (same kernels, same math).

Capture (workers/gpu/capture.py): two eager warm-up calls on a side stream, then the capture, all graphs
sharing one memory pool; the first replay is checked against the eager result. Every call of ``forward`` with
the current buffers is idempotent (it writes the same key/value at the same positions), so capturing right
before a real step is safe.

A failed capture (e.g. the lazy first capture of a longer span bucket under memory pressure) costs only its own
key: that bucket decodes eagerly and its capture is tried again ``CAPTURE_RETRY_SECONDS`` later (doubling), at
most ``CAPTURE_ATTEMPTS`` times in all; every other bucket keeps replaying its graph.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.gpu.capture import capture, check_replay, settle

from .memory import Retry

log = logging.getLogger(__name__)

WARM_UP_CALLS = 2
CAPTURE_ATTEMPTS = 3        # captures of one key in all before it decodes eagerly for good
CAPTURE_RETRY_SECONDS = 30.0   # the first retry of a failed key (then 60 s, ...): memory pressure passes
CAPTURE_RETRY_CAP_SECONDS = 600.0

Key = tuple[int, int]   # (batch bucket, span bucket)


class DecodeGraphs:
    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[Key, tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None     # one memory pool for every graph, made at the first capture
        self._failed: dict[Key, tuple[str, Retry]] = {}
        self.failure: str | None = None     # the latest capture failure, for reports
        self.replays = 0
        self.capture_seconds = 0.0

    @property
    def usable(self) -> bool:
        """Whether graphs replay (or may still be captured) here: some graph exists, or nothing failed yet."""
        return bool(self._graphs) or not self._failed

    @property
    def keys(self) -> list[Key]:
        return sorted(self._graphs)

    def run(self, key: Key, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's logits: a replay of ``key``'s graph (captured now if needed), or ``forward()`` eagerly
        while that key has no graph. The returned tensor is overwritten by the next replay: consume it first."""
        entry = self._graphs.get(key) or self.capture(key, forward)
        if entry is None:
            return forward()
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out

    def capture(self, key: Key, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor] | None:
        """Capture ``key``'s graph now (None: it failed, or its failures' schedule says not yet or never)."""
        failed = self._failed.get(key)
        if failed is not None and not failed[1].due:
            return None
        started = time.perf_counter()
        try:
            entry = self._capture(key, forward)
        except Exception as exc:  # noqa: BLE001 - a capture failure means: this key decodes eagerly, never crash
            self._disable(key, f"{type(exc).__name__}: {exc}"[:300])
            return None
        self._failed.pop(key, None)
        self.capture_seconds += time.perf_counter() - started
        log.info("captured the decode step for batch %d, span %d in %.2f s", key[0], key[1],
                 time.perf_counter() - started)
        self._graphs[key] = entry
        return entry

    def _capture(self, key: Key, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """The CUDA part: warm-up calls on a side stream, the capture into the shared pool, a checked replay
        (the eager logits kept in fp32 for the comparison)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        captured = capture(forward, device=self.device, pool=self._pool, warm_up=WARM_UP_CALLS,
                           snapshot=lambda logits: logits.float())
        check_replay(captured, against="the eager step")
        return captured.graph, captured.outputs

    def _disable(self, key: Key, reason: str) -> None:
        """``key`` decodes eagerly until its next scheduled try (or for good once its attempts are spent)."""
        retry = self._failed[key][1] if key in self._failed else Retry(
            CAPTURE_RETRY_SECONDS, CAPTURE_RETRY_CAP_SECONDS, CAPTURE_ATTEMPTS)
        retry.failed()
        self._failed[key] = (reason, retry)
        self.failure = reason
        final = "; no more attempts" if retry.failures >= CAPTURE_ATTEMPTS else ""
        log.warning("capturing the chat decode step for batch %d, span %d failed (attempt %d; this bucket decodes "
                    "eagerly%s): %s", key[0], key[1], retry.failures, final, reason)
        settle(self.device)

    def describe(self) -> dict[str, object]:
        return {"graphs": [list(k) for k in self.keys], "replays": self.replays,
                "capture_seconds": round(self.capture_seconds, 2), "failure": self.failure,
                "failed": {f"{k}": {"reason": reason, "attempts": retry.failures}
                           for k, (reason, retry) in sorted(self._failed.items())}}

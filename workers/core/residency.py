"""The models' residency on the GPU, behind the GPU lock: reserve memory, load, unload, reload on demand.

The memory manager makes room by asking a worker to unload everything (``/memory/unload``); the worker is then
``unloaded`` and loads again before its next job (``reload_if_unloaded``, the runner's ``before_job``, which
runs under the GPU lock with the job) or, for a kind whose HTTP routes generate (chat), before the next such
request (``reload_for_request``: it waits at most a bounded time for the lock, which a job or another reload
may hold). A load reserves first when the worker holds no reservation; a refusal is a retryable
``WORKER_UNAVAILABLE`` (409 on ``/memory/load``, 503 + ``Retry-After`` on a chat request).

``load`` and ``unload`` expect the caller to hold ``gpu_lock`` (the control routes, the runner, the request
reload), so an unload never lands in the middle of a job. They refuse while the models are still being set up
(``WorkerState.controllable``): the setup does not hold the lock, and an unload beside it would free a
reservation the load then runs without.
"""
from __future__ import annotations

import logging
import threading

from .errors import ErrorType, RetryableError
from .handler import ModelControl
from .memory_client import MemoryClient, ReserveResult
from .state import Lifecycle, WorkerState

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5.0


class Residency:
    def __init__(self, control: ModelControl, memory: MemoryClient, lifecycle: Lifecycle, kind: str):
        self.control = control
        self.memory = memory
        self.lifecycle = lifecycle
        self.kind = kind
        self.gpu_lock = threading.Lock()
        self.reservation: ReserveResult | None = None

    @property
    def unloaded(self) -> bool:
        return self.lifecycle.state is WorkerState.UNLOADED

    def reserve(self) -> ReserveResult:
        """The reservation the setup waits for before loading (the manager sizes it from its table)."""
        self.reservation = self.memory.reserve()
        return self.reservation

    def load(self, which: str) -> str:
        """Reserve unless one is held, then load ``which``; an unloaded worker is ready again."""
        self._check_controllable()
        if self.reservation is None or self.reservation.id is None:
            self.reservation = self.memory.reserve()
            if not self.reservation.may_load:
                raise RetryableError(f"no GPU memory for {self.kind}: {self.reservation.reason}",
                                     ErrorType.WORKER_UNAVAILABLE, delay=RETRY_AFTER_SECONDS)
        message = self.control.load(which)
        self.lifecycle.move(WorkerState.READY)
        return message

    def unload(self, which: str) -> str:
        """Unload ``which``; ``all`` also gives the reservation back and leaves the worker unloaded."""
        self._check_controllable()
        message = self.control.unload(which)
        if which == "all":
            self.lifecycle.move(WorkerState.UNLOADED)
            self.memory.release(self.reservation)
            self.reservation = None
        return message

    def reload_if_unloaded(self) -> None:
        """Before each job, under the GPU lock the runner holds: bring an evicted worker's models back."""
        if self.unloaded:
            self.load("all")

    def reload_for_request(self, which: str, wait_seconds: float) -> None:
        """Load ``which`` again if the worker was unloaded, waiting at most ``wait_seconds`` for the GPU lock;
        concurrent requests wait for the first one's reload instead of loading twice."""
        if not self.unloaded:
            return
        if not self.gpu_lock.acquire(timeout=wait_seconds):
            raise RetryableError(f"the {self.kind} model is being reloaded or the GPU is busy; retry shortly",
                                 ErrorType.WORKER_UNAVAILABLE, delay=RETRY_AFTER_SECONDS)
        try:
            if self.unloaded:   # not reloaded meanwhile by the request that held the lock
                log.info("%s was unloaded (evicted); reloading %s for a request", self.kind, which)
                self.load(which)
        finally:
            self.gpu_lock.release()

    def describe(self) -> dict:
        """``/memory/status``'s ``memory_manager`` document: what a restarted manager rebuilds its ledger from."""
        return self.memory.describe(self.reservation, self.unloaded)

    def _check_controllable(self) -> None:
        state = self.lifecycle.state
        if not state.controllable:
            raise RetryableError(f"the worker is {state.value}; try again once it is ready",
                                 ErrorType.WORKER_UNAVAILABLE, delay=RETRY_AFTER_SECONDS)

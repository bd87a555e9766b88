"""What a worker process is doing: one ``WorkerState`` field, changed only through the table below.

The service used to derive its state from five loose flags; a flag set in the wrong order (a stop during a load,
a trip during a stop) could report one thing while doing another. Now every change is a ``move`` that the table
allows or refuses, under one lock, so concurrent threads (the setup thread, a signal handler, the watchdog, an
admin request) cannot interleave half-changes:

    loading             -> loading, waiting for memory, ready, setup failed, stopping, tripped
    waiting for memory  -> waiting for memory (a new reason), loading, setup failed, stopping, tripped
    ready               -> ready, unloaded, stopping, tripped
    unloaded            -> unloaded, ready, stopping, tripped
    stopping            -> tripped
    tripped, setup failed: final (the process is about to exit)

``busy`` is never stored: the job loop, not the service, knows when a job starts and ends (``Runner.current``),
so a ready or unloaded worker is *reported* busy while it holds one (``reported(busy)``). Entering stopping,
tripped or setup failed sets ``stopped``, the event that wakes every thread waiting to end (the job loop, the
outbox sender, the setup's waits); it is never cleared. The strings are the wire values of ``/health`` and
``/status`` (``state``).
"""
from __future__ import annotations

import threading
from enum import StrEnum


class WorkerState(StrEnum):
    LOADING = "loading"
    WAITING_FOR_MEMORY = "waiting for memory"
    READY = "ready"
    BUSY = "busy"
    UNLOADED = "unloaded"   # evicted by the memory manager; reloads on demand (the next job or chat request)
    SETUP_FAILED = "setup failed"
    STOPPING = "stopping"
    TRIPPED = "tripped"     # the worker stopped itself (breaker, fatal error, watchdog); it exits with a code

    @property
    def serving(self) -> bool:
        """``/health`` answers 200: the worker takes jobs (an unloaded one reloads for the next)."""
        return self in (WorkerState.READY, WorkerState.BUSY, WorkerState.UNLOADED)

    @property
    def controllable(self) -> bool:
        """``/memory/load`` and ``/memory/unload`` may act: never while the models are still being set up,
        where an unload would race the load it cannot see and leave the memory ledger wrong."""
        return self not in (WorkerState.LOADING, WorkerState.WAITING_FOR_MEMORY, WorkerState.SETUP_FAILED)


S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.LOADING: frozenset({S.LOADING, S.WAITING_FOR_MEMORY, S.READY, S.SETUP_FAILED, S.STOPPING, S.TRIPPED}),
    S.WAITING_FOR_MEMORY: frozenset({S.WAITING_FOR_MEMORY, S.LOADING, S.SETUP_FAILED, S.STOPPING, S.TRIPPED}),
    S.READY: frozenset({S.READY, S.UNLOADED, S.STOPPING, S.TRIPPED}),
    S.UNLOADED: frozenset({S.UNLOADED, S.READY, S.STOPPING, S.TRIPPED}),
    S.STOPPING: frozenset({S.TRIPPED}),
    S.TRIPPED: frozenset(),
    S.SETUP_FAILED: frozenset(),
    S.BUSY: frozenset(),   # reported, never stored
}
ENDING = frozenset({S.STOPPING, S.TRIPPED, S.SETUP_FAILED})   # entering one sets ``stopped``


class Lifecycle:
    """The one state field of a worker, its reason (shown as ``error`` on ``/health``) and the stop event."""

    def __init__(self, state: WorkerState = WorkerState.LOADING):
        if state is WorkerState.BUSY:
            raise ValueError("busy is reported, never stored")
        self._state = state
        self._reason: str | None = None
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        if state in ENDING:
            self.stopped.set()

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the worker is not serving (waiting for memory, tripped, setup failed); None otherwise."""
        return self._reason

    def move(self, new: WorkerState, reason: str | None = None) -> bool:
        """Change to ``new`` (with ``reason``, or none) if the table allows it; False if it refuses, e.g. a
        load that finishes after a stop began, or a second trip. Refusals are expected, never errors."""
        with self._lock:
            if new not in TRANSITIONS[self._state]:
                return False
            self._state, self._reason = new, reason
            if new in ENDING:
                self.stopped.set()
            return True

    def reported(self, busy: bool) -> tuple[WorkerState, str | None]:
        """The state on the wire and its reason, read together: a ready or unloaded worker that holds a job
        is busy."""
        with self._lock:
            state, reason = self._state, self._reason
        if busy and state in (WorkerState.READY, WorkerState.UNLOADED):
            return WorkerState.BUSY, reason
        return state, reason

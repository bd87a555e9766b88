"""One supervised program: its spec, its state machine, and what the status page shows of it.

States::

    EXITED ──start──> STARTING ──/health 200──> RUNNING
                        │  died / start timeout    │ died
                        v                          v
                      BACKOFF <────────────────────┘   (a quick failure; too many in a row → FATAL)
                        │ delay over ──> STARTING
    STARTING, RUNNING ──shutdown──> STOPPING ──process gone──> EXITED
    RUNNING ──N failed /live checks in a row──> STOPPING ──process gone──> BACKOFF (or FATAL)
    BACKOFF ──shutdown──> EXITED

``/health`` is readiness (the start gate, and the ``health`` the status shows); ``/live`` is liveness (the
process and its job loop work, even while loading or busy): only liveness restarts a RUNNING program.
A health restart (RUNNING → STOPPING, reason "unhealthy: ...") stops the process like a shutdown does
(SIGTERM, grace, cold stop, SIGKILL; see orchestrator.supervisor); its end counts like a crash: a quick
failure unless the run lasted ``Backoff.stable_seconds``. Outside a shutdown, STOPPING is always a health
restart; during a shutdown, a program already STOPPING just goes on stopping and ends EXITED.

A command that cannot be executed at all goes from EXITED or BACKOFF straight to FATAL, and so does a process
that exits with a code whose ``restart_is_futile`` is true (``common.exit_codes``: a config error or a failed
boot would only fail the same way again, after another full model load). Every other exit takes the backoff
path; a code from the table is named in the reason ("exited with status 76 (BREAKER_OPEN)").
FATAL is final: the program is not restarted again (the others keep running) until the orchestrator restarts.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from common.exit_codes import ExitCode

log = logging.getLogger("orchestrator")


def exit_name(code: int | None) -> str | None:
    """``-9`` → ``"SIGKILL"``, ``78`` → ``"CONFIG_ERROR"``; None for a code outside the table (0 and 1 are
    left unnamed: for a child they mean "stopped" and "failed", not the orchestrator's own OK/KILLED_CHILDREN)."""
    if code is None:
        return None
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    try:
        return ExitCode(code).name if code > ExitCode.KILLED_CHILDREN else None
    except ValueError:
        return None


def describe_exit(code: int) -> str:
    name = exit_name(code)
    if code < 0:
        return f"killed by {name}"
    return f"exited with status {code}" + (f" ({name})" if name else "")


def restart_is_futile(code: int | None) -> bool:
    """Whether the process said (by its exit code) that starting it again would fail the same way."""
    try:
        return code is not None and code > 0 and ExitCode(code).restart_is_futile
    except ValueError:
        return False


class ProgramState(str, Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"

    @property
    def has_process(self) -> bool:
        """Whether a process of this program may be alive in this state."""
        return self in (ProgramState.STARTING, ProgramState.RUNNING, ProgramState.STOPPING)

    @property
    def is_final(self) -> bool:
        """Nothing will happen to the program any more (until the orchestrator restarts)."""
        return self in (ProgramState.EXITED, ProgramState.FATAL)

    def can_become(self, other: ProgramState) -> bool:
        return other in _TRANSITIONS[self]


_S = ProgramState
_TRANSITIONS: dict[ProgramState, frozenset[ProgramState]] = {
    _S.EXITED: frozenset({_S.STARTING, _S.FATAL}),
    _S.STARTING: frozenset({_S.RUNNING, _S.BACKOFF, _S.FATAL, _S.STOPPING}),
    _S.RUNNING: frozenset({_S.BACKOFF, _S.FATAL, _S.STOPPING}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.EXITED, _S.FATAL}),
    _S.STOPPING: frozenset({_S.EXITED, _S.BACKOFF, _S.FATAL}),  # BACKOFF/FATAL: the end of a health restart
    _S.FATAL: frozenset(),
}


class TransitionError(RuntimeError):
    """A state change the machine does not allow (a supervisor bug, never a child's fault)."""


@dataclass(frozen=True)
class ProgramSpec:
    """What to run and how to tell that it serves."""

    name: str
    command: tuple[str, ...]
    port: int
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/health"   # readiness: the start gate, and the status
    live_path: str = "/live"       # liveness: a RUNNING program failing it is restarted
    start_timeout: float = 60.0
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES given to it, None = inherited
    stop_wave: int = 0      # shutdown stops wave 0 first, then 1, ... (see orchestrator.supervisor)

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.health_path}"

    @property
    def live_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.live_path}"


@dataclass(frozen=True)
class Backoff:
    """Restart policy: exponential delay, and how many quick failures in a row make a program FATAL."""

    base_seconds: float = 1.0
    max_seconds: float = 60.0
    max_quick_failures: int = 5
    stable_seconds: float = 60.0  # a run that lasted this long resets the quick-failure count

    def delay(self, failures: int) -> float:
        """Delay before restart number ``failures`` (1, 2, ...): base, 2·base, 4·base, ... capped."""
        return min(self.max_seconds, self.base_seconds * 2 ** max(0, failures - 1))


class Program:
    """The runtime record of one program. Only the supervisor thread mutates it."""

    def __init__(self, spec: ProgramSpec, clock: Callable[[], float]):
        self.spec = spec
        self._clock = clock
        self.state = ProgramState.EXITED
        self.state_since = clock()
        self.pid: int | None = None
        self.started_at: float | None = None    # spawn time of the current process
        self.running_since: float | None = None
        self.restarts = 0                        # spawns after the first one
        self.spawns = 0
        self.quick_failures = 0
        self.retry_at: float | None = None       # BACKOFF: when to start again
        self.last_exit: int | None = None        # exit status (negative = killed by that signal)
        self.health: str = "unknown"             # "ok", "unavailable (503)", "no answer", ...
        self.health_checked_at: float | None = None
        self.live: str = "unknown"               # the last /live check: "ok", "unavailable (503)", ...
        self.failed_checks = 0                   # RUNNING: consecutive failed /live checks
        self.reason: str = ""                    # why the last transition happened

    @property
    def name(self) -> str:
        return self.spec.name

    def become(self, new: ProgramState, reason: str) -> None:
        if not self.state.can_become(new):
            raise TransitionError(f"{self.name}: {self.state.value} -> {new.value} is not allowed")
        log.log(logging.ERROR if new is ProgramState.FATAL else logging.INFO,
                "%s: %s -> %s (%s)", self.name, self.state.value, new.value, reason)
        self.state = new
        self.state_since = self._clock()
        self.reason = reason

    def spawned(self, pid: int) -> None:
        self.become(ProgramState.STARTING, f"spawned pid {pid}")
        if self.spawns:
            self.restarts += 1
        self.spawns += 1
        self.pid = pid
        self.started_at = self._clock()
        self.running_since = None
        self.retry_at = None
        self.health = "unknown"
        self.live = "unknown"
        self.failed_checks = 0

    def serving(self) -> None:
        assert self.started_at is not None
        self.become(ProgramState.RUNNING, f"/health 200 after {self._clock() - self.started_at:.1f} s")
        self.running_since = self._clock()

    def checked(self, ok: bool, detail: str, now: float) -> None:
        """Record a /health (readiness) check."""
        self.health = detail
        self.health_checked_at = now

    def live_checked(self, ok: bool, detail: str) -> None:
        """Record a /live check; while RUNNING, count the failed ones in a row."""
        self.live = detail
        if self.state is ProgramState.RUNNING:
            self.failed_checks = 0 if ok else self.failed_checks + 1

    def restarting(self, why: str) -> None:
        """RUNNING → STOPPING for a health restart (the run time still counts when the process is gone)."""
        self.become(ProgramState.STOPPING, f"unhealthy: {why}; restarting")

    def failed(self, why: str, policy: Backoff, futile: bool = False) -> None:
        """The process died, never became healthy, or ended its health restart: BACKOFF, or FATAL (too many
        quick failures, or ``futile``: its exit code says a restart would fail the same way)."""
        now = self._clock()
        if self.running_since is not None and now - self.running_since >= policy.stable_seconds:
            self.quick_failures = 0
        self.quick_failures += 1
        self.pid = None
        self.running_since = None
        if futile:
            self.become(ProgramState.FATAL, f"{why}: restarting cannot help, not restarting")
            return
        if self.quick_failures >= policy.max_quick_failures:
            self.become(ProgramState.FATAL, f"{why}; {self.quick_failures} quick failures in a row, not restarting")
            return
        delay = policy.delay(self.quick_failures)
        self.retry_at = now + delay
        self.become(ProgramState.BACKOFF, f"{why}; restart in {delay:.1f} s")

    def gone(self, why: str) -> None:
        self.pid = None
        self.running_since = None
        self.retry_at = None
        self.become(ProgramState.EXITED, why)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "port": self.spec.port,
            "gpu": self.spec.gpu,
            "uptime_seconds": round(now - self.running_since, 1) if self.running_since is not None else None,
            "restarts": self.restarts,
            "quick_failures": self.quick_failures,
            "health": self.health,
            "live": self.live,
            "failed_checks": self.failed_checks,
            "last_exit": self.last_exit,
            "last_exit_name": exit_name(self.last_exit),
            "reason": self.reason,
            "state_seconds": round(now - self.state_since, 1),
        }

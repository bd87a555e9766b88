"""The supervisor loop: start in order behind health gates, restart with backoff, stop in reverse order.

One thread (the one calling :meth:`Supervisor.run`) owns every :class:`Program` and spawns every child, so
that the children's PR_SET_PDEATHSIG stays tied to a thread that lives as long as the orchestrator.
Signal handlers only call :meth:`Supervisor.request_stop` (a flag); the loop does the work.

Start: programs are launched in the given order; the next one is launched once the previous one's first
attempt is over (``/health`` answered 200, or it failed and went to BACKOFF/FATAL), so a broken program never
blocks the others.

Stop, in reverse start order, wave by wave (``ProgramSpec.stop_wave``: the fleet stops the model workers
first, then the router, then the memory manager): SIGTERM to each member of the wave (a worker finishes or
hands back its job) and wait; all waves share one grace period (a later wave still gets ``kill_after``, at
most the grace). Then a cold stop for what is left: a second SIGTERM to the leader and SIGINT to its whole
process group (gunicorn's master ignores signals while it stops, but its worker process takes SIGINT as
"quit now": the model worker hands its job back); wait ``kill_after``; then SIGKILL of each remaining process
group. Another stop request during the wait cuts the grace period short.

Exit codes: a child's exit status is read against ``common.exit_codes``. One whose ``restart_is_futile`` is
true (CONFIG_ERROR, BOOT_FAILED, APP_LOAD_FAILED) makes the program FATAL at once; the others (BREAKER_OPEN,
WATCHDOG, FATAL_WORKER_ERROR, HANDED_BACK, ...) restart with the normal backoff. Both are named in the reason.

Orphans: with ``adopt_orphans`` (the orchestrator is PID 1 or a child subreaper, see orchestrator.reaper) each
pass also reaps exited processes that are not its own children, so no zombie is left behind by a group kill.

Health restart: every ``health_interval`` a RUNNING program's ``/live`` (liveness) is checked, then, if it
answered, its ``/health`` (readiness, for the status: a worker busy or reloading is not restarted for it); a
STARTING one only against its start timeout. After ``unhealthy_restart_checks`` failed ``/live`` checks in a
row (no answer, or not 200; 0 = never), the program is stopped the same way as a shutdown, without
blocking the loop (the others stay supervised): SIGTERM to the leader (a worker hands its job back), after
``stop_grace`` the cold stop, after ``kill_after`` more SIGKILL of the group; once it is gone it takes the
normal BACKOFF path (a quick failure only if its run was short, as for a crash).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence

from common.exit_codes import ExitCode
from common.http import Health, check_health

from .child import Child
from .program import Backoff, Program, ProgramSpec, ProgramState, describe_exit, restart_is_futile
from .reaper import reap_orphans

log = logging.getLogger("orchestrator")

STARTING_CHECK_SECONDS = 0.25


class Supervisor:
    def __init__(self, specs: Sequence[ProgramSpec], policy: Backoff, *, stop_grace: float,
                 kill_after: float, health_interval: float, unhealthy_restart_checks: int = 6,
                 health_check: Callable[[str], Health] = check_health,
                 clock: Callable[[], float] = time.monotonic, tick: float = 0.1, adopt_orphans: bool = False):
        self.programs = [Program(spec, clock) for spec in specs]
        self.policy = policy
        self.stop_grace = stop_grace
        self.kill_after = kill_after
        self.health_interval = health_interval
        self.unhealthy_restart_checks = unhealthy_restart_checks
        self._health_check = health_check
        self._clock = clock
        self._tick = tick
        self._adopt_orphans = adopt_orphans
        self._children: dict[str, Child] = {}
        self._cold_stopped: set[str] = set()  # health restarts that already got the cold stop
        self._launched = 0
        self._stop_requests = 0
        self._wake = threading.Event()
        self.started_at = clock()

    # ---------------------------------------------------------------- called from other threads / signals
    def request_stop(self) -> None:
        """First call: warm stop. Second call: skip what is left of the grace period."""
        self._stop_requests += 1
        self._wake.set()

    def status(self) -> dict:
        return {"uptime_seconds": round(self._clock() - self.started_at, 1),
                "stopping": self._stop_requests > 0,
                "programs": [p.status() for p in self.programs]}

    # ---------------------------------------------------------------- the loop
    def run(self) -> ExitCode:
        while not self._stop_requests:
            self.step()
            if self.programs and all(p.state is ProgramState.FATAL for p in self.programs):
                log.error("every program is FATAL: nothing left to supervise")
                return ExitCode.ALL_FATAL
            self._wake.wait(self._tick)
        return self.shutdown()

    def step(self) -> None:
        """One pass: reap the dead, check health, restart after backoff, launch the next program."""
        now = self._clock()
        for program in self.programs:
            child = self._children.get(program.name)
            if child is not None and program.state.has_process:
                code = child.poll()
                if code is not None:
                    restarted = program.state is ProgramState.STOPPING  # outside shutdown: a health restart
                    self._reap(program, child, code)
                    program.failed(("health restart: " if restarted else "") + describe_exit(code), self.policy,
                                   futile=restart_is_futile(code))
                    continue
            if program.state is ProgramState.STARTING:
                self._check_starting(program, now)
            elif program.state is ProgramState.RUNNING:
                self._check_running(program, now)
            elif program.state is ProgramState.STOPPING:
                self._escalate_restart(program, now)
            elif program.state is ProgramState.BACKOFF and program.retry_at is not None and now >= program.retry_at:
                self._spawn(program)
        self._reap_orphans()
        self._launch_next()

    def _reap_orphans(self) -> None:
        if not self._adopt_orphans:
            return
        for pid, code in reap_orphans({child.pid for child in self._children.values()}):
            log.info("reaped orphan pid %d (%s)", pid, describe_exit(code))

    def _launch_next(self) -> None:
        while self._launched < len(self.programs):
            if self._launched > 0:
                previous = self.programs[self._launched - 1]
                if previous.state is ProgramState.STARTING and previous.spawns == 1:
                    return  # its first attempt is not over: wait for /health (health gating)
            self._spawn(self.programs[self._launched])
            self._launched += 1

    def _spawn(self, program: Program) -> None:
        spec = program.spec
        try:
            child = Child(spec.name, spec.command, spec.env)
        except OSError as exc:
            program.become(ProgramState.FATAL, f"cannot execute {spec.command[0]!r}: {exc.strerror or exc}")
            return
        self._children[spec.name] = child
        program.spawned(child.pid)

    def _check_starting(self, program: Program, now: float) -> None:
        assert program.started_at is not None
        if program.health_checked_at is not None and now - program.health_checked_at < STARTING_CHECK_SECONDS:
            return
        health = self._probe(program, now)
        if health.ok:
            program.serving()
        elif now - program.started_at > program.spec.start_timeout:
            child = self._children[program.name]
            child.kill_group()
            self._reap(program, child, child.poll())
            program.failed(f"no /health 200 within {program.spec.start_timeout:g} s (last: {health.detail})",
                           self.policy)

    def _check_running(self, program: Program, now: float) -> None:
        if program.health_checked_at is not None and now - program.health_checked_at < self.health_interval:
            return
        before = program.health
        live = self._health_check(program.spec.live_url)
        program.live_checked(live.ok, live.detail)
        if live.ok:
            health = self._probe(program, now)
        else:   # a process that does not answer /live: no second wait on /health
            health = live
            program.checked(False, live.detail, now)
        if health.detail != before:
            log.log(logging.INFO if health.ok else logging.WARNING, "%s: health %s (was %s)",
                    program.name, health.detail, before)
        limit = self.unhealthy_restart_checks
        if limit and program.failed_checks >= limit:
            log.error("%s: /live failed %d checks in a row (every %g s, last: %s): restarting pid %s "
                      "(SIGTERM, cold stop after %g s, SIGKILL %g s later)", program.name, program.failed_checks,
                      self.health_interval, live.detail, program.pid, self.stop_grace, self.kill_after)
            program.restarting(f"{program.failed_checks} failed /live checks in a row (last: {live.detail})")
            self._children[program.name].signal(signal.SIGTERM)

    def _escalate_restart(self, program: Program, now: float) -> None:
        """A health restart whose process is still alive: cold stop after the grace, then SIGKILL."""
        child = self._children[program.name]
        stopping_for = now - program.state_since
        if stopping_for >= self.stop_grace + self.kill_after:
            log.error("%s: still running %g s after the cold stop: SIGKILL to its process group",
                      program.name, self.kill_after)
            child.kill_group()
            code = child.poll()
            self._reap(program, child, code)
            program.failed("health restart: " + (describe_exit(code) if code is not None else "killed"), self.policy)
        elif stopping_for >= self.stop_grace and program.name not in self._cold_stopped:
            log.warning("%s: grace period over; cold stop (second SIGTERM, SIGINT to the group)", program.name)
            self._cold_stopped.add(program.name)
            child.signal(signal.SIGTERM)
            child.signal_group(signal.SIGINT)

    def _probe(self, program: Program, now: float) -> Health:
        health = self._health_check(program.spec.health_url)
        program.checked(health.ok, health.detail, now)
        return health

    def _reap(self, program: Program, child: Child, code: int | None) -> None:
        child.kill_group()  # whatever the leader left behind in its group
        program.last_exit = code
        self._children.pop(program.name, None)
        self._cold_stopped.discard(program.name)

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> ExitCode:
        waves = sorted({p.spec.stop_wave for p in self.programs})
        log.info("stopping: SIGTERM in reverse start order, wave by wave (grace %g s)", self.stop_grace)
        deadline = self._clock() + self.stop_grace
        killed = False
        for wave in waves:
            members = [p for p in reversed(self.programs) if p.spec.stop_wave == wave]
            for program in members:
                if program.state is ProgramState.BACKOFF:
                    program.gone("stopped during backoff")
                elif program.state is ProgramState.STOPPING:
                    pass  # a health restart under way: its SIGTERM is sent, it now ends EXITED
                elif program.state.has_process and program.name in self._children:
                    program.become(ProgramState.STOPPING, "SIGTERM (warm stop)")
                    self._children[program.name].signal(signal.SIGTERM)
            names = {p.name for p in members}
            wave_deadline = max(deadline, self._clock() + min(self.kill_after, self.stop_grace))
            if self._wait_stopping(names, wave_deadline, stop_on_request=True):
                deadline = self._clock()  # a second stop request: no more grace for anyone
            killed |= self._force(names)
        log.info("stopped: every program has exited")
        return ExitCode.KILLED_CHILDREN if killed else ExitCode.OK

    def _force(self, names: set[str]) -> bool:
        """Second SIGTERM (cold stop) to what is left of ``names``, then SIGKILL. True if anything was killed."""
        left = [n for n in names if n in self._children]
        if not left:
            return False
        log.warning("stopping: grace period over; cold stop (second SIGTERM, SIGINT to the group) for %s",
                    ", ".join(left))
        for name in left:
            child = self._children[name]
            child.signal(signal.SIGTERM)
            child.signal_group(signal.SIGINT)
        self._wait_stopping(names, self._clock() + self.kill_after)
        left = [n for n in names if n in self._children]
        for name in left:
            log.error("%s: still running after the grace period: SIGKILL to its process group", name)
            self._children[name].kill_group()
        self._wait_stopping(names, self._clock())
        return bool(left)

    def _wait_stopping(self, names: set[str], deadline: float, stop_on_request: bool = False) -> bool:
        """Reap the children of ``names`` until none is left or the deadline passes. With ``stop_on_request``,
        a second stop request (the first started the shutdown) ends the wait early (returns True)."""
        while True:
            for program in self.programs:
                child = self._children.get(program.name)
                if program.name in names and child is not None:
                    code = child.poll()
                    if code is not None:
                        self._reap(program, child, code)
                        program.gone(describe_exit(code))
            self._reap_orphans()
            if not any(n in self._children for n in names) or self._clock() >= deadline:
                return False
            if stop_on_request and self._stop_requests > 1:
                log.warning("stopping: another stop request, skipping the rest of the grace period")
                return True
            time.sleep(0.05)

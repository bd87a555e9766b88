"""The supervision state machine: allowed transitions, backoff, FATAL after quick failures."""
from __future__ import annotations

import pytest

from orchestrator.program import Backoff, Program, ProgramSpec, ProgramState, TransitionError

S = ProgramState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def program(clock: Clock) -> Program:
    return Program(ProgramSpec("sdxl", ("true",), 7859), clock)


def test_transition_table() -> None:
    assert S.EXITED.can_become(S.STARTING) and S.STARTING.can_become(S.RUNNING)
    assert S.RUNNING.can_become(S.BACKOFF) and S.BACKOFF.can_become(S.STARTING)
    assert S.RUNNING.can_become(S.STOPPING) and S.STOPPING.can_become(S.EXITED)
    assert not S.FATAL.can_become(S.STARTING) and not S.EXITED.can_become(S.RUNNING)
    assert not S.STOPPING.can_become(S.RUNNING) and not S.RUNNING.can_become(S.STARTING)
    assert [s.has_process for s in S] == [True, True, False, True, False, False]
    assert {s for s in S if s.is_final} == {S.EXITED, S.FATAL}
    assert S("RUNNING") is S.RUNNING and S.RUNNING == "RUNNING"


def test_illegal_transition_raises() -> None:
    p = program(Clock())
    with pytest.raises(TransitionError, match="EXITED -> RUNNING"):
        p.become(S.RUNNING, "no")


def test_backoff_doubles_and_caps() -> None:
    policy = Backoff(base_seconds=1, max_seconds=10)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_quick_failures_end_fatal_and_a_stable_run_resets_them() -> None:
    clock = Clock()
    p = program(clock)
    policy = Backoff(base_seconds=1, max_seconds=60, max_quick_failures=3, stable_seconds=30)
    p.spawned(1)
    p.serving()
    clock.now += 100                    # a long, stable run: its failure is the first quick one
    p.failed("exited with status 1", policy)
    assert (p.state, p.quick_failures, p.retry_at) == (S.BACKOFF, 1, clock.now + 1)
    for expected_delay in (2,):
        p.spawned(2)
        p.failed("exited with status 1", policy)  # never served: quick
        assert (p.state, p.retry_at) == (S.BACKOFF, clock.now + expected_delay)
    p.spawned(3)
    p.failed("exited with status 1", policy)
    assert p.state is S.FATAL and "3 quick failures" in p.reason
    assert (p.restarts, p.spawns, p.pid) == (2, 3, None)


def test_status_document() -> None:
    clock = Clock()
    p = program(clock)
    p.spawned(42)
    clock.now += 2
    p.serving()
    clock.now += 5
    status = p.status()
    assert status["state"] == "RUNNING" and status["pid"] == 42 and status["uptime_seconds"] == 5.0
    assert status["restarts"] == 0 and status["port"] == 7859


def test_health_restart_counts_like_a_crash() -> None:
    clock = Clock()
    p = program(clock)
    policy = Backoff(base_seconds=1, max_seconds=60, max_quick_failures=2, stable_seconds=30)
    p.spawned(1)
    p.live_checked(False, "unavailable (503)")  # STARTING: never counted
    assert p.failed_checks == 0
    p.serving()
    for _ in range(3):
        p.checked(False, "unavailable (503)", clock.now)   # readiness: shown, never counted
    assert (p.failed_checks, p.health) == (0, "unavailable (503)")
    for _ in range(3):
        p.live_checked(False, "no answer")
    assert (p.failed_checks, p.live) == (3, "no answer")
    p.live_checked(True, "ok")
    assert p.failed_checks == 0
    p.live_checked(False, "no answer")
    clock.now += 100                    # a long run: its health restart is the first quick failure
    p.restarting("1 failed /live checks in a row (last: no answer)")
    assert p.state is S.STOPPING and p.reason.startswith("unhealthy: ")
    p.failed("health restart: exited with status 0", policy)
    assert (p.state, p.quick_failures, p.retry_at) == (S.BACKOFF, 1, clock.now + 1)
    p.spawned(2)
    assert p.failed_checks == 0
    p.serving()
    p.restarting("1 failed /live checks in a row (last: no answer)")  # a short run: quick again → FATAL
    p.failed("health restart: killed by SIGKILL", policy)
    assert p.state is S.FATAL and "2 quick failures" in p.reason

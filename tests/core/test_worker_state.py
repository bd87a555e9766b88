"""The worker's one state field (workers/core/state.py): the wire strings, the transition table, the stop event
and the busy overlay, on the enum and the ``Lifecycle`` alone (no process, no Redis)."""
from __future__ import annotations

import threading

import pytest

from workers.core.state import ENDING, TRANSITIONS, Lifecycle, WorkerState

S = WorkerState


def test_the_wire_strings_are_the_ones_health_has_always_reported():
    assert [s.value for s in S] == ["loading", "waiting for memory", "ready", "busy", "unloaded", "setup failed",
                                    "stopping", "tripped"]
    assert {s for s in S if s.serving} == {S.READY, S.BUSY, S.UNLOADED}


def test_the_table_covers_every_state_and_never_stores_busy():
    assert set(TRANSITIONS) == set(S)
    assert all(S.BUSY not in targets for targets in TRANSITIONS.values())
    with pytest.raises(ValueError):
        Lifecycle(S.BUSY)


@pytest.mark.parametrize("start, new, allowed", [
    (S.LOADING, S.READY, True), (S.LOADING, S.WAITING_FOR_MEMORY, True), (S.WAITING_FOR_MEMORY, S.LOADING, True),
    (S.WAITING_FOR_MEMORY, S.READY, False),      # a grant goes through loading first
    (S.LOADING, S.UNLOADED, False),              # an unload cannot land in the middle of the setup
    (S.READY, S.UNLOADED, True), (S.UNLOADED, S.READY, True), (S.UNLOADED, S.UNLOADED, True),
    (S.STOPPING, S.READY, False),                # a load that finishes after a stop began takes no job
    (S.STOPPING, S.UNLOADED, False), (S.STOPPING, S.TRIPPED, True),
    (S.TRIPPED, S.TRIPPED, False), (S.TRIPPED, S.STOPPING, False), (S.TRIPPED, S.READY, False),
    (S.SETUP_FAILED, S.READY, False), (S.SETUP_FAILED, S.STOPPING, False),
])
def test_moves_follow_the_table(start, new, allowed):
    lifecycle = Lifecycle(start)
    assert lifecycle.move(new) is allowed
    assert lifecycle.state is (new if allowed else start)


def test_every_non_final_state_can_trip_and_stop():
    for state in (S.LOADING, S.WAITING_FOR_MEMORY, S.READY, S.UNLOADED):
        assert {S.STOPPING, S.TRIPPED} <= TRANSITIONS[state], state
    assert TRANSITIONS[S.TRIPPED] == TRANSITIONS[S.SETUP_FAILED] == frozenset()


def test_entering_an_ending_state_sets_the_stop_event_and_nothing_else_does():
    lifecycle = Lifecycle()
    for state in (S.WAITING_FOR_MEMORY, S.LOADING, S.READY, S.UNLOADED, S.READY):
        assert lifecycle.move(state) and not lifecycle.stopped.is_set()
    assert lifecycle.move(S.STOPPING) and lifecycle.stopped.is_set()
    assert ENDING == {S.STOPPING, S.TRIPPED, S.SETUP_FAILED}
    for state in ENDING:
        assert Lifecycle(state).stopped.is_set()


def test_the_reason_belongs_to_the_state_it_came_with():
    lifecycle = Lifecycle()
    lifecycle.move(S.WAITING_FOR_MEMORY, "waiting for GPU memory: wan holds 30 GB")
    assert lifecycle.reported(busy=False) == (S.WAITING_FOR_MEMORY, "waiting for GPU memory: wan holds 30 GB")
    lifecycle.move(S.LOADING)
    assert lifecycle.reason is None
    lifecycle.move(S.READY)
    lifecycle.move(S.TRIPPED, "5 jobs in a row failed")
    assert not lifecycle.move(S.TRIPPED, "job j overran its deadline")   # the first reason stands
    assert lifecycle.reported(busy=True) == (S.TRIPPED, "5 jobs in a row failed")


@pytest.mark.parametrize("stored, reported", [(S.READY, S.BUSY), (S.UNLOADED, S.BUSY), (S.STOPPING, S.STOPPING),
                                              (S.TRIPPED, S.TRIPPED), (S.LOADING, S.LOADING)])
def test_a_worker_holding_a_job_is_reported_busy_only_while_it_serves(stored, reported):
    lifecycle = Lifecycle(stored)
    assert lifecycle.reported(busy=True)[0] is reported
    assert lifecycle.reported(busy=False)[0] is stored
    assert lifecycle.state is stored


def test_concurrent_trips_and_stops_leave_one_trip_with_one_reason():
    """The breaker, the watchdog and a SIGTERM at once: exactly one trip wins, the stop never undoes it."""
    lifecycle = Lifecycle(S.READY)
    won: list[str] = []
    start = threading.Barrier(16)

    def trip(n: int) -> None:
        start.wait()
        if n % 2:
            lifecycle.move(S.STOPPING)
        elif lifecycle.move(S.TRIPPED, f"reason {n}"):
            won.append(f"reason {n}")

    threads = [threading.Thread(target=trip, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(won) == 1 and lifecycle.reported(busy=False) == (S.TRIPPED, won[0])
    assert lifecycle.stopped.is_set()


def test_models_may_be_controlled_only_once_the_setup_is_over():
    assert {s for s in S if not s.controllable} == {S.LOADING, S.WAITING_FOR_MEMORY, S.SETUP_FAILED}

"""The seed policy, decision by decision, through the real HTTP API and client, on a fixed-capacity probe.

Capacity 48 GB, safety margin 1 GB; sizes sdxl 10 (always), chat 15 (when possible), wan 30 (on demand).
"""
from __future__ import annotations

import threading

from memory_manager.ledger import Ledger, Pressure
from memory_manager.policy import MemoryPolicy
from memory_manager.probe import FixedProbe
from tests.orchestrator.support import wait_for
from workers.core.memory_client import Grant

from .conftest import ADMIN, start_manager, stop_manager


def kinds(manager) -> list[str]:
    return [e.kind for e in manager.policy.ledger.history]


def test_grant_when_it_fits(manager) -> None:
    sdxl, chat = manager.workers["sdxl"], manager.workers["chat"]
    assert sdxl.reserve().outcome is Grant.GRANTED
    assert chat.reserve().outcome is Grant.GRANTED
    (gpu,) = manager.policy.status()["gpus"]
    assert (gpu["reserved_gb"], gpu["available_gb"], gpu["workers"]) == (25.0, 22.0, ["chat", "sdxl"])
    assert sdxl.calls == [] and chat.calls == []
    assert kinds(manager) == ["grant", "grant"]


def test_unload_idle_lower_tier_then_grant(manager) -> None:
    sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
    sdxl.reserve()
    chat.reserve()
    grant = wan.reserve()  # 30 > 22 available: chat (when possible, idle) gives way
    assert grant.outcome is Grant.GRANTED and grant.may_load
    assert chat.calls == [{"action": "unload", "auth": f"Bearer {ADMIN}", "which_query": "all",
                           "which_body": "all"}]
    assert sdxl.calls == []  # always resident: never asked
    held = {r.worker: r.gb for r in manager.policy.ledger.all()}
    assert held == {"sdxl": 10.0, "wan": 30.0}
    assert kinds(manager)[-3:] == ["release", "unload", "grant"]  # chat released its own during the unload
    assert "after unloading chat" in manager.policy.ledger.history[-1].detail


def test_refuse_with_the_reason_when_nothing_can_give_way(manager) -> None:
    sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
    sdxl.reserve()
    chat.reserve()
    chat.busy = True  # a chat job is running: 409 on unload
    refused = wan.reserve()
    assert refused.outcome is Grant.REFUSED and not refused.may_load
    assert "needs 30 GB on GPU 0, 22.0 GB available" in refused.reason
    assert "chat busy (a job is running)" in refused.reason
    assert "not unloadable for this request: sdxl" in refused.reason
    assert chat.actions() == ["unload"] and sdxl.calls == []
    assert {r.worker for r in manager.policy.ledger.all()} == {"sdxl", "chat"}
    assert kinds(manager)[-1] == "refuse"


def test_eviction_follows_priority_and_never_touches_sdxl(manager) -> None:
    sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
    assert wan.reserve(gb=30).outcome is Grant.GRANTED
    assert chat.reserve(gb=15).outcome is Grant.GRANTED            # 48-45-1 = 2 left
    assert sdxl.reserve().outcome is Grant.GRANTED                 # sdxl (1): wan (3) goes first, that suffices
    assert wan.actions() == ["unload"] and chat.calls == []
    assert wan.reserve(gb=30).outcome is Grant.GRANTED             # wan: chat (when possible) gives way
    assert chat.actions() == ["unload"] and sdxl.calls == []
    assert {r.worker: r.gb for r in manager.policy.ledger.all()} == {"sdxl": 10.0, "wan": 30.0}
    assert wan.reserve(gb=40).outcome is Grant.REFUSED             # 48-10-1: only sdxl left, and it stays
    assert sdxl.calls == []
    assert {r.worker: r.gb for r in manager.policy.ledger.all()} == {"sdxl": 10.0, "wan": 30.0}  # kept


def test_predictive_reload_once_memory_allows() -> None:
    manager = start_manager(capacity=60.0)
    manager.attach("sdxl", "chat", "wan")
    try:
        sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
        sdxl.reserve()
        chat.reserve()
        wan.busy = True
        wan.reserve(gb=45)                          # 60-25-1 = 34 < 45: chat unloaded for wan
        assert chat.actions() == ["unload"] and wan.grant.outcome is Grant.GRANTED
        manager.policy.tick()                       # 60-55-1 = 4 < 15: memory does not allow
        assert chat.actions() == ["unload"]
        wan.busy = False
        manager.policy.tick()                       # wan idle changes nothing: still no room
        assert chat.actions() == ["unload"]
        wan.client.release(wan.grant)               # wan done with its memory
        manager.policy.tick()                       # it fits: chat asked to load, with the admin key
        assert chat.actions() == ["unload", "load"] and chat.calls[-1]["auth"] == f"Bearer {ADMIN}"
        assert "reload" in kinds(manager)
        wait_for(lambda: manager.policy.ledger.of_worker("chat"), what="chat reserved again after loading")
        manager.policy.tick()                       # asked once, not again
        assert chat.actions() == ["unload", "load"]
    finally:
        stop_manager(manager)


def test_pressure_levels_and_the_probe_view_bound_the_grant() -> None:
    manager = start_manager(capacity=48.0)
    manager.attach("sdxl", "wan")
    try:
        gpu = lambda: manager.policy.status()["gpus"][0]  # noqa: E731
        assert gpu()["pressure"] == Pressure.LOW
        for free, level in ((14.9, "medium"), (9.9, "high"), (4.9, "critical"), (15, "low")):
            manager.probe.set_free(0, free)
            assert gpu()["pressure"] == level
        manager.probe.set_free(0, 20.0)             # something outside the ledger holds 28 GB
        refused = manager.workers["wan"].reserve(gb=30)
        assert refused.outcome is Grant.REFUSED and "19.0 GB available" in refused.reason
        assert manager.workers["sdxl"].reserve().outcome is Grant.GRANTED
        manager.policy.tick()
        (sample,) = manager.policy.report()["pressure_history"]
        assert sample["gpus"][0]["reserved_gb"] == 10.0
    finally:
        stop_manager(manager)


def test_reservations_are_per_gpu() -> None:
    manager = start_manager(capacity=40.0, gpus=2)
    try:
        chat0, wan1 = manager.client("chat", gpu=0), manager.client("wan", gpu=1)
        assert chat0.reserve().outcome is Grant.GRANTED
        assert wan1.reserve(gb=35).outcome is Grant.GRANTED      # GPU 1 is empty: chat on GPU 0 untouched
        assert manager.workers["chat"].calls == []
        assert manager.client("sdxl", gpu=1).reserve().outcome is Grant.GRANTED  # sdxl unloads wan on GPU 1
        assert manager.workers["wan"].actions() == ["unload"] and manager.workers["chat"].calls == []
    finally:
        stop_manager(manager)


def test_dead_worker_loses_its_reservations_after_missed_health_checks(manager) -> None:
    sdxl, chat = manager.workers["sdxl"], manager.workers["chat"]
    sdxl.reserve()
    chat.reserve()
    sdxl.server.stop()                              # the sdxl process died
    manager.policy.tick()
    manager.policy.tick()
    assert {r.worker for r in manager.policy.ledger.all()} == {"sdxl", "chat"}  # two misses: not yet
    manager.policy.tick()
    assert {r.worker for r in manager.policy.ledger.all()} == {"chat"}
    assert kinds(manager)[-1] == "drop"


def test_restarted_worker_replaces_its_previous_instance(manager) -> None:
    chat = manager.workers["chat"]
    first = chat.reserve(gb=8, label="instruct")
    assert chat.client.reserve(gb=8, label="instruct").outcome is Grant.GRANTED  # same label: replaced
    assert [r.gb for r in manager.policy.ledger.of_worker("chat")] == [8.0]
    restarted = manager.client("chat")              # a new process: a new instance id
    assert restarted.reserve(gb=6, label="base").outcome is Grant.GRANTED
    held = manager.policy.ledger.of_worker("chat")
    assert [(r.label, r.gb, r.instance) for r in held] == [("base", 6.0, restarted.instance)]
    assert first.id not in {r.id for r in held}
    assert kinds(manager).count("replace") == 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_evicted_chat_reloads_once_there_is_room_while_wan_stays_busy() -> None:
    """#14: a WAN backlog (busy at every sample) must not starve chat's reload when chat fits beside it."""
    manager = start_manager(capacity=60.0)
    manager.attach("sdxl", "chat", "wan")
    try:
        sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
        sdxl.reserve()
        chat.reserve()
        wan.busy = True                             # a backlog: busy whenever the manager looks
        assert wan.client.reserve(gb=30, label="t2v").outcome is Grant.GRANTED   # 60-25-1 = 34: fits
        vace = wan.client.reserve(gb=15, label="vace")                          # 4 left: chat gives way
        assert vace.outcome is Grant.GRANTED and chat.actions() == ["unload"]
        manager.policy.tick()
        assert chat.actions() == ["unload"]         # 60-55-1 = 4 < 15: no room yet
        assert wan.client.release(vace)             # VACE done; WAN still busy with its t2v backlog
        manager.policy.tick()                       # 60-40-1 = 19 >= 15: room beside WAN's reservations
        assert chat.actions() == ["unload", "load"]
        wait_for(lambda: manager.policy.ledger.of_worker("chat"), what="chat reserved again")
        assert {r.worker: r.gb for r in manager.policy.ledger.all()} == {"sdxl": 10.0, "wan": 30.0, "chat": 15.0}
    finally:
        stop_manager(manager)


def test_reload_waits_until_the_room_has_lasted_the_quiet_period() -> None:
    clock = Clock()
    manager = start_manager(capacity=48.0, clock=clock, reload_quiet_seconds=30.0)
    manager.attach("sdxl", "chat", "wan")
    try:
        sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
        sdxl.reserve()
        chat.reserve()
        wan.reserve(gb=30)                          # chat unloaded for wan
        wan.client.release(wan.grant)               # wan done: 48-10-1 = 37 >= 15, room from now on
        for seconds in (0, 20):
            clock.now = 1000 + seconds
            manager.policy.tick()
        manager.probe.set_free(0, 10.0)             # at 25 s something else takes the memory: no room
        clock.now = 1025
        manager.policy.tick()
        manager.probe.set_free(0, 48.0)             # room again from 40 s: the quiet period starts over
        for seconds in (40, 69):
            clock.now = 1000 + seconds
            manager.policy.tick()
        assert chat.actions() == ["unload"]
        clock.now = 1071
        manager.policy.tick()
        assert chat.actions() == ["unload", "load"]
    finally:
        stop_manager(manager)


def test_the_sweep_drops_the_silent_instance_not_its_successor(manager) -> None:
    """#20: chat misses its checks, restarts and reserves while the third check is in flight: the new
    instance's grant stays (the sweep is keyed by instance, not by worker name)."""
    chat = manager.workers["chat"]
    chat.reserve()
    chat.health_hang = 1.5                          # longer than the manager's 1 s health timeout: no answer
    manager.policy.tick()
    manager.policy.tick()
    restarted = manager.client("chat")              # the new process, reserving during the third check
    chat.on_health = lambda: restarted.reserve()
    manager.policy.tick()
    held = manager.policy.ledger.of_worker("chat")
    assert [(r.instance, r.gb) for r in held] == [(restarted.instance, 15.0)]
    assert "drop" not in kinds(manager)


def test_a_wedged_unload_does_not_stall_other_reservations_or_the_tick(manager) -> None:
    """#20: the decision lock is not held across /memory/unload calls."""
    sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
    sdxl.reserve()
    chat.reserve()
    chat.unload_gate = threading.Event()            # chat's /memory/unload hangs until the gate opens
    wan_thread = threading.Thread(target=lambda: wan.reserve(gb=30), daemon=True)
    wan_thread.start()                              # 30 > 22 available: the manager asks chat to unload
    wait_for(lambda: chat.actions() == ["unload"], what="the manager inside chat's unload call")
    others: list = []
    side = threading.Thread(target=lambda: others.append(sdxl.client.reserve(gb=2, label="lora")), daemon=True)
    ticker = threading.Thread(target=manager.policy.tick, daemon=True)
    side.start()
    ticker.start()
    try:
        wait_for(lambda: others and not ticker.is_alive(), timeout=8,
                 what="another reservation and a tick answered while chat's unload hangs")
        assert others[0].outcome is Grant.GRANTED and wan_thread.is_alive()
    finally:
        chat.unload_gate.set()
    wan_thread.join(15)
    assert wan.grant.outcome is Grant.GRANTED and "after unloading chat" in manager.policy.ledger.history[-1].detail
    assert sorted((r.worker, r.label, r.gb) for r in manager.policy.ledger.all()) == [
        ("sdxl", "lora", 2.0), ("sdxl", "model", 10.0), ("wan", "model", 30.0)]


def test_a_worker_being_unloaded_is_not_asked_twice_and_the_refusal_says_why(manager) -> None:
    sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
    sdxl.reserve()
    chat.reserve()
    chat.unload_gate = threading.Event()
    first = threading.Thread(target=lambda: wan.reserve(gb=30), daemon=True)
    first.start()
    wait_for(lambda: chat.actions() == ["unload"], what="chat's unload in flight")
    try:
        second = sdxl.client.reserve(gb=30, label="big")  # 22 available: would need chat's memory too
        assert second.outcome is Grant.REFUSED and "chat is being unloaded for another request" in second.reason
        assert chat.actions() == ["unload"]
    finally:
        chat.unload_gate.set()
    first.join(15)
    assert wan.grant.outcome is Grant.GRANTED


def test_the_census_adopts_what_is_held_but_never_an_id_released_before_it(manager) -> None:
    """A new manager process (a new policy and ledger over the same workers) hears each worker once."""
    sdxl, wan = manager.workers["sdxl"], manager.workers["wan"]
    kept, released = sdxl.reserve(), wan.reserve(gb=30)
    old = manager.policy
    fresh = MemoryPolicy(Ledger(), FixedProbe(48.0), old.workers, old.control, old.settings)
    assert fresh.release(released.id) is None      # wan's release reaches the new manager before its census
    fresh.census()                                  # wan's document still names that id: not adopted
    held = {r.worker: r for r in fresh.ledger.all()}
    assert list(held) == ["sdxl"] and held["sdxl"].id == kept.id and held["sdxl"].instance == sdxl.client.instance
    assert fresh.release(kept.id) is not None       # the adopted id is the worker's own: its release works
    assert [e.kind for e in fresh.ledger.history] == ["adopt", "release"]
    fresh.census()                                  # every worker heard once: never asked again
    assert fresh.ledger.all() == []

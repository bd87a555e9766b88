"""The seed policy, decision by decision, through the real HTTP API and client, on a fixed-capacity probe.

Capacity 48 GB, safety margin 1 GB; sizes sdxl 10 (always), chat 15 (when possible), wan 30 (on demand).
"""
from __future__ import annotations

from memory_manager.client import Grant
from memory_manager.ledger import Pressure

from tests.orchestrator.support import wait_for

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


def test_predictive_reload_once_wan_is_idle_and_memory_allows() -> None:
    manager = start_manager(capacity=60.0)
    manager.attach("sdxl", "chat", "wan")
    try:
        sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
        sdxl.reserve()
        chat.reserve()
        wan.busy = True
        wan.reserve(gb=45)                          # 60-25-1 = 34 < 45: chat unloaded for wan
        assert chat.actions() == ["unload"] and wan.grant.outcome is Grant.GRANTED
        manager.policy.tick()                       # wan busy: no reload
        assert chat.actions() == ["unload"]
        wan.busy = False
        manager.policy.tick()                       # wan idle, but 60-55-1 = 4 < 15: memory does not allow
        assert chat.actions() == ["unload"]
        wan.client.release(wan.grant)               # wan done with its memory
        manager.policy.tick()                       # idle and fits: chat asked to load, with the admin key
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

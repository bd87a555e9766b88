"""A memory manager restart (#14, #20), with real processes: ``python -m memory_manager`` and two real
``python -m workers`` processes (the fast fake handler, reserving as chat and as wan), on loopback.

Capacity 40 GB, margin 1: chat (15) and wan (30) do not fit together, so wan's start evicts chat. The manager is
SIGKILLed and started again: the new one must learn from the workers what they hold (wan's reservation, with
its id, so that wan's release works) and that chat was evicted, and reload chat once wan gives its memory back.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.orchestrator.support import ROOT, wait_for
from tests.procs import distinct_ports

from .conftest import ADMIN

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def get(url: str) -> dict | None:
    try:
        response = requests.get(url, timeout=2)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture
def fleet(tmp_path: Path):
    ports = distinct_ports("memory_manager", "chat", "wan", "sdxl")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTASH_", "REDIS_", "SUPABASE_"))}
    env = {**base, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "WORKER_ADMIN_KEY": ADMIN, "MEMORY_MANAGER_URL": f"http://127.0.0.1:{ports['memory_manager']}",
           "MEMORY_MANAGER_PORT": str(ports["memory_manager"]), "CHAT_PORT": str(ports["chat"]),
           "WAN_PORT": str(ports["wan"]), "SDXL_PORT": str(ports["sdxl"]), "MEMORY_PROBE": "capacity",
           "MEMORY_CAPACITY_GB": "40", "GPU_COUNT": "1", "MEMORY_TICK_SECONDS": "0.2",
           "MEMORY_RELOAD_QUIET_SECONDS": "0"}
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def manager() -> subprocess.Popen:
        proc = start("-m", "memory_manager")
        wait_for(lambda: get(f"{env['MEMORY_MANAGER_URL']}/health"), timeout=20, what="the memory manager up")
        return proc

    def worker(kind: str) -> str:
        start("-m", "workers", kind, "--port", str(ports[kind]), "--handler",
              f"tests.memory_manager.handlers:create_{kind}")
        url = f"http://127.0.0.1:{ports[kind]}"
        wait_for(lambda: requests.get(f"{url}/health", timeout=2).status_code == 200 if get(f"{url}/status")
                 else None, timeout=30, what=f"{kind} worker ready")
        return url

    yield env["MEMORY_MANAGER_URL"], manager, worker
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def held(manager_url: str) -> dict[str, list[str]]:
    document = get(f"{manager_url}/memory/status") or {"reservations": []}
    found: dict[str, list[str]] = {}
    for r in document["reservations"]:
        found.setdefault(r["worker"], []).append(r["id"])
    return found


def test_a_restarted_manager_rederives_the_ledger_and_reloads_evicted_chat(fleet) -> None:
    url, manager, worker = fleet
    first = manager()
    chat = worker("chat")
    assert list(held(url)) == ["chat"]
    wan = worker("wan")                                    # 15 + 30 > 39: chat gives way to wan
    before = held(url)
    assert list(before) == ["wan"]
    assert get(f"{chat}/memory/status")["memory_manager"]["unloaded"] is True

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    manager()                                              # a fresh process: its memory starts empty
    wait_for(lambda: held(url) == before, timeout=10, what="wan's reservation adopted, with its id")
    report = get(f"{url}/memory/report")
    assert [(e["worker"], e["gpu"]) for e in report["evicted"]] == [("chat", 0)]
    assert [e["kind"] for e in report["history"]].count("reload") == 0  # 39 - 30 < 15: no room yet

    unloaded = requests.post(f"{wan}/memory/unload", json={"which": "all"}, headers=AUTH, timeout=10)
    assert unloaded.status_code == 200                     # wan releases its reservation by its old id
    wait_for(lambda: list(held(url)) == ["chat"], timeout=10, what="chat reloaded by the new manager")
    assert get(f"{chat}/memory/status")["memory_manager"]["unloaded"] is False
    kinds = [e["kind"] for e in get(f"{url}/memory/report")["history"]]
    assert kinds.count("adopt") == 1 and "release" in kinds and kinds.count("reload") == 1

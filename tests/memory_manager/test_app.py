"""The memory manager's endpoints and their auth, the emergency operations, and the client when it is down."""
from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from common.errors import ConfigError
from common.settings import Secret
from local.net import free_port
from memory_manager.config import MemorySettings
from memory_manager.ledger import Pressure
from tests.orchestrator.support import ROOT, wait_for
from workers.core.memory_client import Grant, MemoryClient

from .conftest import ADMIN, start_manager, stop_manager

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def operate(manager, body: dict, headers: dict | None = AUTH) -> requests.Response:
    return requests.post(f"{manager.url}/emergency/operation", json=body, headers=headers or {}, timeout=30)


def test_read_only_routes_need_no_key(manager) -> None:
    manager.workers["sdxl"].reserve()
    status = requests.get(f"{manager.url}/memory/status", timeout=10).json()
    assert status["success"] and status["probe"] == "capacity"
    assert status["gpus"][0]["reserved_gb"] == 10.0 and status["reservations"][0]["worker"] == "sdxl"
    assert status["policy"]["chat"] == {"priority": 2, "residency": "when_possible", "size_gb": 15.0}
    report = requests.get(f"{manager.url}/memory/report", timeout=10).json()
    assert [e["kind"] for e in report["history"]] == ["grant"] and "pressure_history" in report
    assert requests.get(f"{manager.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}])
def test_changes_need_the_admin_key(manager, headers) -> None:
    url = manager.url
    assert requests.post(f"{url}/reservations", json={"worker": "sdxl"}, headers=headers,
                         timeout=10).status_code == 401
    assert requests.delete(f"{url}/reservations/r1", headers=headers, timeout=10).status_code == 401
    assert operate(manager, {"operation": "status"}, headers).status_code == 401
    assert manager.policy.ledger.all() == []


def test_no_admin_key_configured_refuses_everything_and_the_client_carries_on() -> None:
    manager = start_manager(admin=None)
    try:
        response = requests.post(f"{manager.url}/reservations", json={"worker": "sdxl"}, headers=AUTH, timeout=10)
        assert response.status_code == 401 and "WORKER_ADMIN_KEY" in response.json()["error"]
        grant = manager.client("sdxl").reserve()
        assert grant.outcome is Grant.UNAVAILABLE and grant.may_load  # the worker loads anyway
    finally:
        stop_manager(manager)


def test_reservation_round_trip_and_bad_requests(manager) -> None:
    response = requests.post(f"{manager.url}/reservations", json={"worker": "chat", "gpu": 0, "gb": 12.5},
                             headers=AUTH, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["success"] and body["worker"] == "chat" and body["gb"] == 12.5 and body["priority"] == 2
    assert requests.delete(f"{manager.url}/reservations/{body['id']}", headers=AUTH, timeout=10).status_code == 200
    assert requests.delete(f"{manager.url}/reservations/{body['id']}", headers=AUTH, timeout=10).status_code == 404
    for bad, word in (({"worker": "other"}, "worker"), ({"worker": "chat", "gpu": 1}, "gpu"),
                      ({"worker": "chat", "gb": -1}, "gb"), ({"worker": "chat", "priority": "x"}, "priority")):
        response = requests.post(f"{manager.url}/reservations", json=bad, headers=AUTH, timeout=10)
        assert response.status_code == 400 and word in response.json()["error"]
    response = requests.post(f"{manager.url}/reservations", data=b"not json", headers=AUTH, timeout=10)
    assert response.status_code == 400
    refused = requests.post(f"{manager.url}/reservations", json={"worker": "wan", "gb": 200}, headers=AUTH,
                            timeout=10)
    assert refused.status_code == 409 and refused.json()["success"] is False
    assert "needs 200 GB" in refused.json()["reason"]


def test_emergency_operations(manager) -> None:
    sdxl, chat, wan = (manager.workers[n] for n in ("sdxl", "chat", "wan"))
    sdxl.reserve()
    chat.reserve()
    assert operate(manager, {"operation": "status"}).json()["gpus"][0]["reserved_gb"] == 25.0
    assert operate(manager, {"operation": "memory_report"}).json()["history"]
    bad = operate(manager, {"operation": "reboot"})
    assert bad.status_code == 400 and "force_cleanup" in bad.json()["error"]

    freed = operate(manager, {"operation": "handle_emergency_request", "worker": "wan", "gb": 30}).json()
    assert freed["satisfied"] and freed["unloaded"] == ["chat"] and chat.actions() == ["unload"]
    assert manager.workers["wan"].reserve(gb=30).outcome is Grant.GRANTED

    wan.busy = True
    result = operate(manager, {"operation": "force_unload_all_except", "keep": "sdxl"}).json()
    assert result["results"] == {"wan": "busy (a job is running)", "chat": "unloaded"}
    assert wan.calls[-1]["auth"] == f"Bearer {ADMIN}" and sdxl.calls == []
    assert {r.worker for r in manager.policy.ledger.all()} == {"sdxl", "wan"}

    wan.server.stop()  # wan died: force_cleanup drops it at once (no waiting for missed ticks)
    dropped = operate(manager, {"operation": "force_cleanup"}).json()["dropped"]
    assert [r["worker"] for r in dropped] == ["wan"]
    assert [e.kind for e in manager.policy.ledger.history].count("emergency") == 3


def test_client_when_the_manager_is_down() -> None:
    client = MemoryClient(f"http://127.0.0.1:{free_port()}", "sdxl", 0, Secret(ADMIN), timeout=2)
    grant = client.reserve()
    assert grant.outcome is Grant.UNAVAILABLE and grant.may_load
    assert client.release("r1") is False and client.release(grant) is False


def test_pressure_thresholds_and_settings() -> None:
    assert [Pressure.of(f, 5, 10, 15) for f in (4.99, 5, 9.99, 10, 14.99, 15)] == [
        Pressure.CRITICAL, Pressure.HIGH, Pressure.HIGH, Pressure.MEDIUM, Pressure.MEDIUM, Pressure.LOW]
    settings = MemorySettings.from_env({"MEMORY_SIZES_GB": "wan:24,chat:16.5", "MEMORY_CRITICAL_GB": "3"})
    assert settings.sizes_gb == {"sdxl": 10.0, "chat": 16.5, "wan": 24.0} and settings.critical_gb == 3
    for env in ({"MEMORY_SIZES_GB": "wan"}, {"MEMORY_SIZES_GB": "gpu:3"}, {"MEMORY_HIGH_GB": "20"},
                {"MEMORY_PROBE": "magic"}):
        with pytest.raises(ConfigError):
            MemorySettings.from_env(env)


def test_python_m_memory_manager_serves_with_gunicorn(tmp_path) -> None:
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MEMORY_MANAGER_PORT": str(port),
           "MEMORY_PROBE": "capacity", "MEMORY_CAPACITY_GB": "24", "GPU_COUNT": "2", "WORKER_ADMIN_KEY": ADMIN,
           "MEMORY_TICK_SECONDS": "0.2", "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "memory_manager"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def status():
            try:
                return requests.get(f"{url}/memory/status", timeout=1).json()
            except requests.RequestException:
                return None

        document = wait_for(status, timeout=20, what="memory manager up")
        assert [g["total_gb"] for g in document["gpus"]] == [24.0, 24.0]
        client = MemoryClient(url, "sdxl", 1, Secret(ADMIN))
        grant = client.reserve()
        assert grant.outcome is Grant.GRANTED
        wait_for(lambda: requests.get(f"{url}/memory/report", timeout=2).json()["pressure_history"],
                 what="ticks sampling pressure")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert ADMIN not in output

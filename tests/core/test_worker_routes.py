"""A worker service in-process (no queue configured: HTTP only) with the fake handler: a kind's routes are
mounted beside the common ones, model control goes through the handler's typed errors (an unknown ``which``
is its ``InvalidJob``, a 400), and ``/health``, ``/status`` and ``/memory/*`` follow the state field."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from flask import Blueprint, jsonify

from common.settings import Secret, Settings
from local.net import free_port
from tests.fakes.handlers import FakeHandler
from workers.core.job import Queue
from workers.core.residency import Residency
from workers.core.service import Routes, Service
from workers.core.state import WorkerState

ADMIN = {"Authorization": "Bearer test-admin-key"}


class GatedSetup(FakeHandler):
    """The fake handler whose setup waits for ``gate``: a worker caught in the middle of loading."""

    def __init__(self) -> None:
        super().__init__(Queue.SDXL)
        self.gate = threading.Event()

    def setup(self) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        super().setup()


def hello_routes(handler: FakeHandler, residency: Residency) -> Blueprint:
    """A kind's own routes, declared beside its handler: they see the handler and the worker's residency."""
    routes = Blueprint("hello", __name__)

    @routes.get("/hello")
    def hello():
        return jsonify({"kind": handler.kind, "loaded": handler.loaded, "unloaded": residency.unloaded})
    return routes


@pytest.fixture
def worker() -> Iterator[Callable[..., tuple[Service, object]]]:
    """``worker(handler, routes) -> (service, test client)``, started; stopped at the end."""
    started: list[Service] = []

    def start(handler: FakeHandler, routes: Routes | None = None) -> tuple[Service, object]:
        settings = Settings(worker_admin_key=Secret("test-admin-key"),
                            memory_manager_url=f"http://127.0.0.1:{free_port()}")   # nothing listens there
        service = Service(settings, handler, "routes-test", exit_process=_never_exits, routes=routes)
        client = service.create_app().test_client()
        service.start()
        started.append(service)
        return service, client

    yield start
    for service in started:
        service.stop_warm(1.0)


def _never_exits(code: int):
    raise AssertionError(f"the service tried to exit the process with {code}")


def wait_for_state(client, state: str) -> dict:
    deadline = time.monotonic() + 10
    while (body := client.get("/health").get_json())["state"] != state:
        assert time.monotonic() < deadline, body
        time.sleep(0.01)
    return body


def test_a_kinds_routes_are_mounted_beside_the_common_ones(worker):
    handler = FakeHandler(Queue.SDXL)
    service, client = worker(handler, lambda residency: hello_routes(handler, residency))
    wait_for_state(client, "ready")
    assert client.get("/hello").get_json() == {"kind": "fake", "loaded": True, "unloaded": False}
    assert client.post("/memory/unload", headers=ADMIN).status_code == 200
    assert client.get("/hello").get_json() == {"kind": "fake", "loaded": False, "unloaded": True}
    assert client.get("/status").status_code == 200 and client.get("/metrics").status_code == 200


def test_a_worker_without_routes_of_its_own_serves_only_the_common_ones(worker):
    _, client = worker(FakeHandler(Queue.SDXL))
    wait_for_state(client, "ready")
    assert client.get("/hello").status_code == 404
    rules = {rule.rule for rule in client.application.url_map.iter_rules()}
    assert {"/health", "/status", "/memory/load", "/memory/unload", "/memory/status"} <= rules


@pytest.mark.parametrize("route", ["/memory/load", "/memory/unload"])
def test_an_unknown_which_is_the_handlers_invalid_job_a_400(worker, route):
    handler = FakeHandler(Queue.SDXL)
    service, client = worker(handler)
    wait_for_state(client, "ready")
    response = client.post(f"{route}?which=vace", headers=ADMIN)
    assert response.status_code == 400
    assert response.get_json() == {"success": False, "error": "'which' must be all or fake, got 'vace'"}
    assert handler.loaded and service.lifecycle.state is WorkerState.READY   # nothing happened


def test_health_status_and_memory_status_follow_the_state_field(worker):
    _, client = worker(FakeHandler(Queue.SDXL))
    body = wait_for_state(client, "ready")
    assert body["status"] == "healthy" and body["busy"] is False and "error" not in body
    assert client.post("/memory/unload", json={"which": "all"}, headers=ADMIN).status_code == 200
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["state"] == "unloaded"
    assert client.get("/status").get_json()["state"] == "unloaded"
    assert client.get("/memory/status").get_json()["memory_manager"]["unloaded"] is True
    assert client.post("/memory/load", headers=ADMIN).status_code == 200
    assert client.get("/health").get_json()["state"] == "ready"
    assert client.get("/memory/status").get_json()["memory_manager"]["unloaded"] is False


def test_a_loading_worker_refuses_model_control_until_its_setup_is_over(worker):
    """An unload beside a setup that does not hold the GPU lock would free a reservation the load then runs
    without: 409 (the memory manager reads it as busy and keeps the memory), then ready as usual."""
    handler = GatedSetup()
    service, client = worker(handler)
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["state"] == "loading"
    refused = client.post("/memory/unload", headers=ADMIN)
    assert refused.status_code == 409 and "loading" in refused.get_json()["error"]
    assert client.post("/memory/load", headers=ADMIN).status_code == 409
    handler.gate.set()
    wait_for_state(client, "ready")
    assert client.post("/memory/unload", headers=ADMIN).status_code == 200


def test_a_stop_during_the_setup_wins_over_the_setup_finishing(worker):
    handler = GatedSetup()
    service, client = worker(handler)
    service.begin_warm_stop(1.0)
    handler.gate.set()
    time.sleep(0.2)
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["state"] == "stopping"
    assert health.get_json()["consuming"] is False and service.lifecycle.state is WorkerState.STOPPING

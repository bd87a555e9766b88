"""A memory manager on loopback (real HTTP) with a fixed-capacity probe, and fake workers it can call."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pytest

from common.settings import Secret
from local.net import BackgroundServer
from memory_manager.app import MemoryDeps, create_app
from memory_manager.config import MemorySettings
from memory_manager.control import WorkerControl
from memory_manager.ledger import Ledger
from memory_manager.policy import MemoryPolicy, seed_policies
from memory_manager.probe import FixedProbe
from workers.core.memory_client import MemoryClient, ReserveResult

ADMIN = "test-admin-key"


class FakeWorker:
    """A model worker's control surface: /health, /status (busy), /memory/status, admin-keyed /memory/unload and
    /memory/load.

    Like a real worker, it reserves through :class:`MemoryClient`, releases its reservation when it unloads
    (a DELETE to the manager *while* the manager waits for this unload call), and reports what it holds in
    ``/memory/status`` (``MemoryClient.describe``). Knobs: ``health_hang`` (seconds /health waits before it
    answers, longer than the manager's health timeout = no answer), ``on_health`` (run once inside the next
    /health call), ``unload_gate`` (an Event /memory/unload waits for: a wedged worker).
    """

    def __init__(self, name: str):
        self.name = name
        self.busy = False
        self.unloaded = False
        self.calls: list[dict[str, Any]] = []
        self.client: MemoryClient | None = None
        self.grant: ReserveResult | None = None
        self.health_hang = 0.0
        self.on_health: Callable[[], Any] | None = None
        self.unload_gate: threading.Event | None = None
        self.server = BackgroundServer(self.app)
        self.url = self.server.url

    def reserve(self, **kwargs: Any) -> ReserveResult:
        assert self.client is not None
        self.grant = self.client.reserve(**kwargs)
        return self.grant

    def app(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/health":
            hook, self.on_health = self.on_health, None
            if hook is not None:
                hook()
            time.sleep(self.health_hang)
            return self._json(start_response, 200, {"status": "healthy"})
        if path == "/status":
            return self._json(start_response, 200, {"busy": self.busy})
        if path == "/memory/status":
            held = self.client.describe(self.grant, self.unloaded) if self.client is not None else None
            return self._json(start_response, 200, {"success": True, "busy": self.busy, "memory_manager": held})
        if path in ("/memory/unload", "/memory/load"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length) or b"{}")
            self.calls.append({"action": path.rsplit("/", 1)[1], "auth": environ.get("HTTP_AUTHORIZATION"),
                               "which_query": parse_qs(environ.get("QUERY_STRING", "")).get("which", [None])[0],
                               "which_body": body.get("which")})
            if path == "/memory/unload" and self.unload_gate is not None:
                self.unload_gate.wait(30)
            if self.busy:
                return self._json(start_response, 409, {"success": False, "message": "a job is running"})
            if path == "/memory/unload":
                self.unloaded = True
                if self.grant is not None and self.client is not None:
                    self.client.release(self.grant)
                    self.grant = None
            if path == "/memory/load":
                self.unloaded = False
                if self.client is not None:
                    threading.Thread(target=self.reserve, daemon=True).start()
            return self._json(start_response, 200, {"success": True, "message": "done"})
        return self._json(start_response, 404, {"error": "not found"})

    @staticmethod
    def _json(start_response, status: int, body: dict) -> list[bytes]:
        start_response(f"{status} X", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    def actions(self) -> list[str]:
        return [c["action"] for c in self.calls]


@dataclass
class Manager:
    policy: MemoryPolicy
    probe: FixedProbe
    server: BackgroundServer
    workers: dict[str, FakeWorker]
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.server.url

    def client(self, worker: str, gpu: int = 0, key: str | None = ADMIN) -> MemoryClient:
        return MemoryClient(self.url, worker, gpu, Secret(key) if key else None, timeout=30)

    def attach(self, *names: str) -> None:
        for name in names:
            self.workers[name].client = self.client(name)


def start_manager(capacity: float = 48.0, gpus: int = 1, admin: str | None = ADMIN,
                  clock: Callable[[], float] | None = None, **overrides: Any) -> Manager:
    settings = MemorySettings(**{"capacity_gb": capacity, "reload_quiet_seconds": 0.0, "dead_after_checks": 3,
                                 **overrides})
    workers = {name: FakeWorker(name) for name in ("sdxl", "chat", "wan")}
    table = seed_policies(settings, {name: w.url for name, w in workers.items()})
    probe = FixedProbe(capacity, gpus)
    key = Secret(admin) if admin else None
    policy = MemoryPolicy(Ledger(), probe, table, WorkerControl(table, key, timeout=10, health_timeout=1), settings,
                          clock=clock)
    server = BackgroundServer(create_app(MemoryDeps(policy, key)))
    return Manager(policy, probe, server, workers)


def stop_manager(manager: Manager) -> None:
    manager.server.stop()
    for worker in manager.workers.values():
        if worker.unload_gate is not None:
            worker.unload_gate.set()
        worker.server.stop()


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = start_manager()
    m.attach("sdxl", "chat", "wan")
    yield m
    stop_manager(m)

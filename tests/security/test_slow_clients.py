"""Slow clients against the real servers (router, model workers, the orchestrator in front of router and chat),
all on loopback (review #15 and the /health half of #11).

A slow-loris client sends a request line, then one header byte per second; a slow-body client sends complete
headers with ``Content-Length: 1000000``, then one body byte per second. Each byte arrives well inside any
per-read timeout, so only a *total* deadline (``HTTP_READ_TIMEOUT_SECONDS``, 3 s here) cuts them. N+1 of each
(N = the HTTP thread count) are pinned against a server while a probe calls its health routes every second:
every probe must answer within 2 s (the orchestrator's and the app's check timeout), every slow socket must be
closed by the server within the deadline + 1 s, and a slow body never reaches a backend.
"""
from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from local.net import BackgroundServer, free_port
from tests.orchestrator.support import ROOT, fleet_env, wait_for
from tests.procs import WorkerProcess, distinct_ports, runtime_env

DEADLINE = 3.0          # HTTP_READ_TIMEOUT_SECONDS in these tests
DRIP_SECONDS = 1.0      # one byte per second: never idle long enough for a per-read timeout
PROBE_TIMEOUT = 2.0     # what the orchestrator and the app give a health check
THREADS = 4             # HTTP threads of the servers under attack (N)
SLOW_HEADERS = b"POST /sdxl/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
SLOW_BODY = (b"POST /sdxl/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000000\r\n\r\n{")
SESSION = requests.Session()
SESSION.trust_env = False


class SlowClient(threading.Thread):
    """One socket: ``head`` at once, then one byte every ``DRIP_SECONDS`` until the server ends the connection
    (EOF or reset, after any answer it sends) or ``give_up`` seconds pass. ``lifetime`` is connect → end."""

    def __init__(self, port: int, head: bytes, give_up: float):
        super().__init__(daemon=True)
        self.port, self.head, self.give_up = port, head, give_up
        self.opened: float | None = None
        self.ended: float | None = None
        self.answer = b""
        self.refused = False

    @property
    def lifetime(self) -> float | None:
        return None if self.ended is None or self.opened is None else self.ended - self.opened

    def run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.refused = True  # the server is down: a fault of its own, which the tests report
            self.opened = self.ended = time.monotonic()
            return
        with sock:
            self.opened = time.monotonic()
            sock.sendall(self.head)
            while time.monotonic() - self.opened < self.give_up:
                readable, _, _ = select.select([sock], [], [], DRIP_SECONDS)
                try:
                    if readable:
                        data = sock.recv(65536)
                        self.answer += data
                        if data:
                            continue
                    else:
                        sock.send(b"a" if b"X-Pad" in self.head else b" ")
                        continue
                except OSError:
                    pass
                self.ended = time.monotonic()
                return


def pin(port: int, count: int, give_up: float) -> list[SlowClient]:
    """``count`` slow-header and ``count`` slow-body clients against ``port``, started now."""
    clients = [SlowClient(port, head, give_up) for head in (SLOW_HEADERS, SLOW_BODY) for _ in range(count)]
    for client in clients:
        client.start()
    wait_for(lambda: all(c.opened for c in clients), timeout=5, what="the slow clients connected")
    return clients


@dataclass
class Prober:
    """GETs each of ``urls`` every ``interval`` s (in parallel) for ``duration`` s; ``results`` holds
    ``(url, seconds, status or the exception's name)``."""
    urls: list[str]
    duration: float
    interval: float = 1.0
    results: list[tuple[str, float, Any]] = field(default_factory=list)

    def run(self) -> Prober:
        def probe(url: str) -> tuple[str, float, Any]:
            began = time.monotonic()
            try:
                status: Any = SESSION.get(url, timeout=PROBE_TIMEOUT + 3).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            return url, time.monotonic() - began, status

        end = time.monotonic() + self.duration
        with ThreadPoolExecutor(len(self.urls)) as pool:
            while time.monotonic() < end:
                tick = time.monotonic()
                self.results += pool.map(probe, self.urls)
                time.sleep(max(0.0, self.interval - (time.monotonic() - tick)))
        return self

    def slow_or_failed(self, limit: float = PROBE_TIMEOUT) -> list[tuple[str, float, Any]]:
        return [r for r in self.results if r[2] != 200 or r[1] > limit]


def assert_cut_at_the_deadline(clients: list[SlowClient]) -> None:
    for client in clients:
        client.join(timeout=DEADLINE + 10)
    assert not any(c.refused for c in clients), "the server refused connections: it was down"
    lifetimes = sorted(c.lifetime if c.lifetime is not None else float("inf") for c in clients)
    assert all(t <= DEADLINE + 1 for t in lifetimes), f"slow sockets lived {lifetimes} s (deadline {DEADLINE} s)"


class Backend:
    """A loopback WSGI backend that answers /health 200 and records every other request's path."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.server = BackgroundServer(self.app)

    def app(self, environ, start_response):
        if environ["PATH_INFO"] != "/health":
            self.seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"status": "healthy"}']


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.server.stop()


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hung worker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def start_router(tmp_path: Path, sdxl_port: int, wan_port: int, **extra: str) -> tuple[subprocess.Popen, str]:
    ports = {**distinct_ports("memory_manager", "router", "chat", "status"), "sdxl": sdxl_port, "wan": wan_port}
    env = fleet_env(ports, tmp_path, ROUTER_THREADS=str(THREADS), HTTP_READ_TIMEOUT_SECONDS=str(DEADLINE), **extra)
    proc = subprocess.Popen([sys.executable, "-m", "router", "--host", "127.0.0.1"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports['router']}"

    def up() -> bool:
        try:
            return SESSION.get(url + "/router/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, timeout=30, what="router up")
    return proc, url


@pytest.fixture
def router(tmp_path: Path, backend: Backend) -> Iterator[str]:
    proc, url = start_router(tmp_path, backend.server.port, free_port(), ROUTER_MAX_BODY_MB="1")
    yield url
    proc.terminate()
    proc.wait(20)


def test_router_health_answers_while_slow_clients_are_cut_at_the_deadline(router: str, backend: Backend) -> None:
    port = int(router.rsplit(":", 1)[1])
    clients = pin(port, THREADS + 1, give_up=DEADLINE + 8)
    # a kept-alive connection: one whole request, then the next one dripped (its own deadline, from its start)
    kept_alive = SlowClient(port, b"GET /router/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + SLOW_HEADERS,
                            give_up=DEADLINE + 8)
    kept_alive.start()
    prober = Prober([f"{router}/router/health", f"{router}/health"], duration=DEADLINE + 3).run()
    assert prober.slow_or_failed() == []
    assert_cut_at_the_deadline(clients + [kept_alive])
    assert all(c.answer.startswith(b"HTTP/1.1 408") for c in clients), {c.answer[:40] for c in clients}
    assert kept_alive.answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in kept_alive.answer
    assert backend.seen == []  # a slow body is cut before any upstream call
    answer = SESSION.post(f"{router}/sdxl/generate", json={"prompt": "x"}, timeout=10)
    assert answer.status_code == 200 and backend.seen == ["/generate"]  # and the router still forwards


def test_a_chunked_body_over_the_limit_is_413_not_forwarded_cut_short(router: str, backend: Backend) -> None:
    """A body without Content-Length is read ahead like any other; past the limit (1 MiB here) it is refused,
    never handed on truncated (werkzeug alone cuts such a stream at the limit without an error)."""
    size = 1024 * 1024 + 4096
    request = (b"POST /sdxl/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n{%s}\r\n0\r\n\r\n" % (size, b" " * (size - 2)))
    with socket.create_connection(("127.0.0.1", int(router.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(request)
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, answer[:300]
    assert "larger than" in json.loads(body)["error"]
    assert backend.seen == []


def test_router_health_fan_out_does_not_queue_callers_behind_a_hung_worker(tmp_path: Path, backend: Backend,
                                                                           hung_port: int) -> None:
    """8 concurrent /health callers every second while WAN accepts connections and never answers."""
    proc, url = start_router(tmp_path, backend.server.port, hung_port)
    try:
        prober = Prober([f"{url}/health"] * 8, duration=3.0, interval=1.0).run()
        # one fan-out waits the router's 2 s health timeout for the hung worker; no caller waits for another's
        # (the app's registration check allows 5 s)
        assert prober.slow_or_failed(limit=3.0) == []
        body = SESSION.get(f"{url}/health", timeout=10).json()
        assert body["workers"] == {"sdxl": {"status": "healthy", "detail": "ok"},
                                   "wan": {"status": "unavailable", "detail": "no answer"}}
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def worker_env(redis_server, supabase_standin, tmp_path: Path) -> dict[str, str]:
    """A worker's environment on the session's Redis and a fresh Supabase stand-in; its log in ``tmp_path``."""
    return runtime_env(redis_server.url, supabase_standin, tmp_path / "storage",
                       HTTP_READ_TIMEOUT_SECONDS=str(DEADLINE))


def test_worker_health_answers_while_slow_clients_are_cut_at_the_deadline(worker_env, tmp_path: Path) -> None:
    worker = WorkerProcess(worker_env, log_path=tmp_path / "worker.log", extra_args=("--threads", str(THREADS)))
    try:
        worker.wait_healthy()
        clients = pin(worker.port, THREADS + 1, give_up=DEADLINE + 8)
        prober = Prober([f"{worker.url}/health"], duration=DEADLINE + 3).run()
        assert prober.slow_or_failed() == []
        assert_cut_at_the_deadline(clients)
        assert SESSION.get(f"{worker.url}/status", timeout=10).status_code == 200
    finally:
        worker.close()


def test_worker_health_answers_under_forty_long_requests(worker_env, tmp_path: Path) -> None:
    """40 requests the app takes 5 s to answer, on a worker with the default 32 HTTP threads: the probe runs
    from 1 s to 4 s, while all 32 are busy and 8 wait."""
    worker = WorkerProcess(worker_env, log_path=tmp_path / "worker.log",
                           handler="tests.security.slow_handler:create_handler")
    try:
        worker.wait_healthy()
        with ThreadPoolExecutor(40) as pool:
            calls = [pool.submit(SESSION.post, f"{worker.url}/slow?seconds=5", timeout=30) for _ in range(40)]
            time.sleep(1.0)  # all 40 sent: 32 running, 8 waiting for a thread
            prober = Prober([f"{worker.url}/health"], duration=3.0, interval=0.5).run()
            answers = [call.result().status_code for call in calls]
        assert prober.slow_or_failed() == []
        assert answers == [200] * 40
    finally:
        worker.close()


def test_under_the_orchestrator_slow_clients_restart_nothing(tmp_path: Path) -> None:
    """The real orchestrator (health every 1 s, restart after 2 failed checks) runs the router and a chat worker;
    for 15 s slow clients keep N+1 sockets of each kind pinned against both (reconnecting when cut)."""
    ports = distinct_ports("memory_manager", "router", "sdxl", "chat", "wan", "status")
    chat = (f"{{python}} -m workers chat --port {{port}} --threads {THREADS} "
            "--handler tests.fakes.handlers:create_handler")
    env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="router,chat", QWEN_INSTRUCT_PATH=str(tmp_path),
                    FLEET_COMMAND_CHAT=chat, ROUTER_THREADS=str(THREADS),
                    HTTP_READ_TIMEOUT_SECONDS=str(DEADLINE), FLEET_HEALTH_INTERVAL_SECONDS="1",
                    FLEET_UNHEALTHY_RESTART_CHECKS="2", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    status_url = f"http://127.0.0.1:{ports['status']}/status"

    def programs() -> dict[str, dict] | None:
        try:
            document = SESSION.get(status_url, timeout=5).json()
        except (requests.RequestException, ValueError):
            return None
        return {p["name"]: p for p in document["programs"]}

    try:
        wait_for(lambda: (p := programs()) and all(v["state"] == "RUNNING" for v in p.values()), timeout=60,
                 what="router and chat RUNNING")
        stop = time.monotonic() + 15
        waves: list[SlowClient] = []
        while time.monotonic() < stop:
            waves += pin(ports["router"], THREADS + 1, give_up=DEADLINE + 8)
            waves += pin(ports["chat"], THREADS + 1, give_up=DEADLINE + 8)
            time.sleep(DEADLINE + 1.5)  # each wave is cut; the attacker opens the next one at once
        final = programs()
        assert final is not None
        assert {name: (p["state"], p["restarts"]) for name, p in final.items()} == \
            {"router": ("RUNNING", 0), "chat": ("RUNNING", 0)}, json.dumps(final)
        assert_cut_at_the_deadline(waves)
    finally:
        proc.terminate()
        proc.wait(60)

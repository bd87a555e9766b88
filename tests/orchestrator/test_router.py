"""The router (``python -m router`` under gunicorn) in front of two loopback echo backends."""
from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import requests

from local.net import BackgroundServer, free_port
from router.app import RouterDeps, create_app

from .support import ROOT, fleet_env, wait_for

GZIPPED = gzip.compress(b'{"zipped": true}')


class Echo:
    """A backend that answers every request with what it received, and remembers it."""

    def __init__(self, name: str, healthy: bool = True):
        self.name = name
        self.healthy = healthy
        self.seen: list[dict[str, Any]] = []
        self.server = BackgroundServer(self.app)

    def app(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/health":
            start_response("200 OK" if self.healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps({"status": "healthy" if self.healthy else "loading"}).encode()]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        seen = {"backend": self.name, "method": environ["REQUEST_METHOD"], "path": path,
                "raw_uri": environ.get("RAW_URI") or environ.get("REQUEST_URI"),
                "query": environ.get("QUERY_STRING", ""), "body": body.decode("latin-1"),
                "headers": {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}}
        if environ.get("CONTENT_TYPE"):
            seen["headers"]["Content-Type"] = environ["CONTENT_TYPE"]
        self.seen.append(seen)
        if path == "/slow":
            time.sleep(3)
        if path == "/gzip":
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Encoding", "gzip")])
            return [GZIPPED]
        start_response("201 Created", [("Content-Type", "application/json"), ("X-Backend", self.name),
                                       ("Proxy-Authenticate", "Basic"), ("Set-Cookie", "a=1"),
                                       ("Set-Cookie", "b=2")])
        return [json.dumps(seen).encode()]


@pytest.fixture(scope="module")
def backends():
    echoes = {"sdxl": Echo("sdxl"), "wan": Echo("wan", healthy=False), "evil": Echo("evil")}
    yield echoes
    for echo in echoes.values():
        echo.server.stop()


@pytest.fixture(scope="module")
def router(backends, tmp_path_factory):
    ports = {"memory_manager": free_port(), "router": free_port(), "sdxl": backends["sdxl"].server.port,
             "chat": free_port(), "wan": backends["wan"].server.port, "status": free_port()}
    env = fleet_env(ports, tmp_path_factory.mktemp("router"), ROUTER_TIMEOUT_SECONDS="1",
                    ROUTER_MAX_BODY_MB="0.01")
    proc = subprocess.Popen([sys.executable, "-m", "router", "--host", "127.0.0.1"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports['router']}"

    def up() -> bool:
        try:
            return requests.get(url + "/router/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, timeout=20, what="router up")
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(autouse=True)
def clear(backends):
    for echo in backends.values():
        echo.seen.clear()


@pytest.mark.parametrize("method, path, backend, backend_path", [
    ("POST", "/sdxl/generate", "sdxl", "/generate"),
    ("PUT", "/sdxl", "sdxl", "/"),
    ("POST", "/wan/enhance", "wan", "/enhance"),
    ("DELETE", "/wan/jobs/7", "wan", "/jobs/7"),
    ("POST", "/enhance", "wan", "/enhance"),
    ("POST", "/memory/unload", "wan", "/memory/unload"),
    ("GET", "/memory/status", "wan", "/memory/status"),
    ("GET", "/debug/env", "wan", "/debug/env"),
    ("PATCH", "/sdxl/a%20b/c", "sdxl", "/a b/c"),
])
def test_each_prefix_reaches_its_backend_intact(router, backends, method, path, backend, backend_path) -> None:
    body = b'{"prompt": "a cat", "n": 1}'
    response = requests.request(method, f"{router}{path}?which=all&x=%2F1", data=body, timeout=10,
                                headers={"Authorization": "Bearer k-123", "Content-Type": "application/json",
                                         "apikey": "abc"})
    assert response.status_code == 201 and response.headers["X-Backend"] == backend
    (seen,) = backends[backend].seen
    assert (seen["method"], seen["path"], seen["query"]) == (method, backend_path, "which=all&x=%2F1")
    assert seen["body"] == body.decode()
    assert seen["headers"]["Authorization"] == "Bearer k-123" and seen["headers"]["Apikey"] == "abc"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert response.headers.get("Set-Cookie") == "a=1, b=2"  # repeated response headers kept
    other = "wan" if backend == "sdxl" else "sdxl"
    assert backends[other].seen == [] and backends["evil"].seen == []


def test_hop_by_hop_headers_are_stripped_both_ways(router, backends) -> None:
    response = requests.post(f"{router}/sdxl/x", data=b"hi", timeout=10, headers={
        "Connection": "keep-alive, X-Private", "X-Private": "secret-hop", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic abc", "Trailer": "X-T", "X-End-To-End": "kept"})
    assert response.status_code == 201
    headers = backends["sdxl"].seen[0]["headers"]
    assert headers["X-End-To-End"] == "kept"
    for hop in ("X-Private", "Keep-Alive", "Te", "Proxy-Authorization", "Trailer"):
        assert hop not in headers
    assert headers.get("Connection", "close").lower() in ("close", "keep-alive")  # the router's own, if any
    assert "Proxy-Authenticate" not in response.headers


def test_content_is_passed_through_undecoded(router) -> None:
    response = requests.get(f"{router}/sdxl/gzip", timeout=10, stream=True,
                            headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.raw.read(decode_content=False) == GZIPPED


def test_unknown_path_is_404_json(router, backends) -> None:
    for path in ("/", "/other", "/sdxlx", "/wanderer", "/chat"):
        response = requests.get(router + path, timeout=10)
        assert response.status_code == 404 and response.json()["success"] is False
    assert all(echo.seen == [] for echo in backends.values())


def test_health_shows_both_workers(router) -> None:
    response = requests.get(f"{router}/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["workers"]["sdxl"]["status"] == "healthy" and body["workers"]["wan"]["status"] == "unavailable"


def test_slow_backend_gives_504_json(router) -> None:
    response = requests.get(f"{router}/sdxl/slow", timeout=10)
    assert response.status_code == 504
    assert response.json() == {"success": False, "error": "the sdxl worker did not answer in time"}


def test_body_over_the_limit_gives_413_json(router, backends) -> None:
    response = requests.post(f"{router}/sdxl/x", data=b"x" * 20_000, timeout=10)
    assert response.status_code == 413 and response.json()["success"] is False
    assert backends["sdxl"].seen == []


def raw_request(url: str, request: bytes) -> bytes:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_never_an_open_proxy(router, backends) -> None:
    evil = backends["evil"].server.url
    evil_hostport = evil.split("//")[1]
    # absolute-form request target naming another server: the path is used, the authority ignored
    answer = raw_request(router, f"GET {evil}/sdxl/abs HTTP/1.1\r\nHost: {evil_hostport}\r\n"
                                 "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 201") and backends["sdxl"].seen[-1]["path"] == "/abs"
    answer = raw_request(router, f"GET {evil}/elsewhere HTTP/1.1\r\nHost: {evil_hostport}\r\n"
                                 "Connection: close\r\n\r\n".encode())
    assert answer.split(b" ")[1] == b"404"
    answer = raw_request(router, f"CONNECT {evil_hostport} HTTP/1.1\r\nHost: {evil_hostport}\r\n"
                                 "Connection: close\r\n\r\n".encode())
    assert answer.split(b" ")[1] == b"405"
    # Host header and path tricks
    for path in ("/sdxl/h", f"/sdxl//{evil_hostport}/x", f"/sdxl/@{evil_hostport}/x", f"/sdxl@{evil_hostport}/x",
                 f"/wan/..%2F..%2F{evil_hostport}", f"/memory/http://{evil_hostport}/x"):
        requests.get(router + path, headers={"Host": evil_hostport, "X-Forwarded-Host": evil_hostport},
                     timeout=10)
    assert backends["evil"].seen == []
    sdxl_seen = backends["sdxl"].seen
    assert sdxl_seen and all(s["headers"]["Host"] == backends["sdxl"].server.url.split("//")[1]
                             for s in sdxl_seen)


def test_down_backend_gives_502_json_and_health_503_when_neither_serves() -> None:
    dead = {"sdxl": f"http://127.0.0.1:{free_port()}", "wan": f"http://127.0.0.1:{free_port()}"}
    server = BackgroundServer(create_app(RouterDeps(backends=dead, timeout=2, connect_timeout=1)))
    try:
        response = requests.post(f"{server.url}/wan/enhance", json={"prompt": "x"}, timeout=10)
        assert response.status_code == 502
        assert response.json() == {"success": False, "error": "the wan worker is not reachable"}
        health = requests.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["workers"]["sdxl"]["status"] == "unavailable"
    finally:
        server.stop()


def test_concurrent_requests_are_served_in_parallel(router, backends) -> None:
    results: list[int] = []

    def call() -> None:
        results.append(requests.get(f"{router}/sdxl/slow", timeout=10).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [504] * 4 and time.monotonic() - began < 3  # four 1-second timeouts, side by side

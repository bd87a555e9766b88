"""A whole fleet (``python -m orchestrator``) on loopback for the security tests, with distinctive secrets.

Every secret setting holds a value starting with ``SEKRET-`` so a scan of logs, responses and callbacks finds
any leak. ``Fleet`` runs the orchestrator the way production does (memory manager, router, SDXL, chat, WAN),
with the tiny demo models; ``ReferenceHosts`` serves reference images on 127.0.0.1, 127.0.0.2 and [::1] (same
port) and records every request, so a test can prove a blocked URL was never fetched.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
import requests
from flask import Flask, Response, redirect, request
from werkzeug.serving import make_server

from local.demo import fleet_env
from local.net import free_port
from tests.procs import distinct_ports
from tests.refserver import png_bytes

ROOT = Path(__file__).resolve().parents[2]

SECRETS = {
    "SUPABASE_SERVICE_KEY": "SEKRET-service-9f3a71c2d8e4",
    "JOB_CALLBACK_SECRET": "SEKRET-callback-5b0e93aa17fd",
    "WAN_WORKER_API_KEY": "SEKRET-wan-c41d6f0b82e9",
    "CHAT_WORKER_API_KEY": "SEKRET-chat-7ae25d93c06b",
    "WORKER_ADMIN_KEY": "SEKRET-admin-e8b3049f15ca",
    "UPSTASH_REDIS_REST_TOKEN": "SEKRET-upstash-2d97be5a6c10",
    "REDIS_PASSWORD": "SEKRET-redis-63fa0d1e9b27",
    "HF_TOKEN": "SEKRET-hf-b5c8e2f7a490",
}
WAN_KEY, CHAT_KEY, ADMIN_KEY = (SECRETS[k] for k in ("WAN_WORKER_API_KEY", "CHAT_WORKER_API_KEY", "WORKER_ADMIN_KEY"))
PROGRAMS = ("memory_manager", "router", "sdxl", "chat", "wan")


class ReferenceHosts:
    """``/image.png`` and ``/redirect?to=`` on 127.0.0.1, 127.0.0.2 and [::1], one port; ``hits`` records
    ``(listener, path with query)`` for every request that arrived."""

    HOSTS = ("127.0.0.1", "127.0.0.2", "::1")

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        app = Flask("security-references")

        @app.before_request
        def record():
            with self._lock:
                self.hits.append((request.environ.get("SERVER_NAME", "?"), request.full_path))

        @app.get("/image.png")
        def image():
            return Response(png_bytes(40, 24), mimetype="image/png")

        @app.get("/redirect")
        def go():
            return redirect(request.args["to"], code=302)

        self.port = free_port()
        self._servers = [make_server(host, self.port, app, threaded=True) for host in self.HOSTS]
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in self._servers]
        for thread in self._threads:
            thread.start()

    def url(self, host: str = "127.0.0.1", path: str = "/image.png") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits_for(self, marker: str) -> list[tuple[str, str]]:
        with self._lock:
            return [hit for hit in self.hits if marker in hit[1]]

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class Fleet:
    """One orchestrator with all five programs. ``transport``: ``redis`` (REDIS_URL with a password) or
    ``upstash`` (UPSTASH_REDIS_REST_* through the local front)."""

    def __init__(self, name: str, workdir: Path, models: dict[str, Path], redis_url: str, standin: Any,
                 upstash: Any = None, **overrides: str | None):
        self.name = name
        self.workdir = workdir
        self.front = upstash
        self.queue: JobQueue | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage = workdir / "storage"
        self.log_dir = workdir / "log"
        self.stdout_path = workdir / "orchestrator.out"
        ports = distinct_ports("memory", "router", "registration", "sdxl", "chat", "wan", "status")
        self.ports = {"memory_manager": ports["memory"], "router": ports["router"], "sdxl": ports["sdxl"],
                      "chat": ports["chat"], "wan": ports["wan"]}
        self.status_port = ports["status"]

        class _Redis:  # fleet_env reads .url only
            url = redis_url
        env = fleet_env(models, _Redis, standin, ports)
        env.update({k: v for k, v in SECRETS.items() if k != "REDIS_PASSWORD"})
        env.pop("UPSTASH_REDIS_REST_TOKEN")
        env.update(
            {
                "STORAGE_DIR": str(self.storage),
                "LOG_DIR": str(self.log_dir),
                "REFERENCE_ALLOW_HOSTS": "127.0.0.1",
                "REFERENCE_TIMEOUT_SECONDS": "5",
                "CHAT_MAX_CONTEXT_TOKENS": "1024",
                "ROUTER_MAX_BODY_MB": "2",
                "CALLBACK_RETRY_SECONDS": "20",
                "FLEET_STOP_GRACE_SECONDS": "20",
                "WAN_ENHANCE_TIMEOUT_SECONDS": "20",
                "HF_HUB_OFFLINE": "1",
                "QUEUE_POLL_MIN_SECONDS": "0.05",
                "QUEUE_POLL_MAX_SECONDS": "0.3",
                "FLEET_HEALTH_INTERVAL_SECONDS": "2",
                "FLEET_UNHEALTHY_RESTART_CHECKS": "30",
                "TMPDIR": str(workdir / "tmp"),
            }
        )
        (workdir / "tmp").mkdir(exist_ok=True)
        if upstash is not None:
            env.pop("REDIS_URL")
            env.update({"UPSTASH_REDIS_REST_URL": upstash.url, "UPSTASH_REDIS_REST_TOKEN": upstash.token})
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.env = env
        self._out = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.exit_code: int | None = None

    def url(self, program: str) -> str:
        return f"http://127.0.0.1:{self.ports[program]}"

    @property
    def settings(self) -> dict[str, str]:
        return self.env

    def wait_ready(self, timeout: float = 180.0) -> Fleet:
        deadline = time.monotonic() + timeout
        pending = list(PROGRAMS)
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleet {self.name}: orchestrator exited with {self.proc.returncode}:\n"
                                   + self.stdout_path.read_text(errors="replace")[-3000:])
            program = pending[0]
            try:
                path = "/router/health" if program == "router" else "/health"
                if requests.get(self.url(program) + path, timeout=2).status_code == 200:
                    pending.pop(0)
                    continue
            except requests.RequestException:
                pass
            time.sleep(0.2)
        if pending:
            raise TimeoutError(f"fleet {self.name}: {pending} not healthy; log tail:\n"
                               + self.stdout_path.read_text(errors="replace")[-3000:])
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_text(self) -> str:
        """The orchestrator's stdout (every child's output goes through it) and every file in LOG_DIR."""
        if not self._out.closed:
            self._out.flush()
        parts = [self.stdout_path.read_text(errors="replace")]
        parts += [p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*")) if p.is_file()]
        return "\n".join(parts)


class JobQueue:
    """Pushes jobs the way the app's producer does (``["<job json>"]``) over Redis or Upstash REST."""

    def __init__(self, client: redis.Redis | None = None, upstash: Any = None):
        self.client = client
        self.upstash = upstash

    def push(self, queue: str, element: str | bytes | dict) -> None:
        if isinstance(element, dict):
            element = json.dumps([json.dumps(element)])
        if self.client is not None:
            self.client.rpush(queue, element)
            return
        data = element if isinstance(element, bytes) else element.encode()
        answer = requests.post(f"{self.upstash.url}/rpush/{queue}", data=data,
                               headers={"Authorization": f"Bearer {self.upstash.token}"}, timeout=10)
        answer.raise_for_status()

    def redis(self) -> redis.Redis:
        if self.client is not None:
            return self.client
        return redis.Redis.from_url(self.upstash.redis_url)


def wait_all(standin: Any, job_ids: list[str], timeout: float = 90.0) -> dict[str, dict]:
    """The terminal (completed or failed) callback body of each job."""
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while len(found) < len(job_ids):
        for job_id in job_ids:
            if job_id in found:
                continue
            terminal = [c for c in standin.callbacks(job_id) if c.status in ("completed", "failed")]
            if terminal:
                found[job_id] = terminal[-1].body
        if len(found) < len(job_ids):
            if time.monotonic() > deadline:
                missing = sorted(set(job_ids) - set(found))
                raise TimeoutError(f"no terminal callback for {missing[:5]} ({len(missing)} in all)")
            time.sleep(0.1)
    return found

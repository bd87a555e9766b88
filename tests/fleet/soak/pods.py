"""A pod of the soak: one ``python -m orchestrator`` fleet (memory manager, router, the three model workers with
the fake handler), with its own ``RUNPOD_POD_ID``, ports and log directory, sharing Redis and Supabase with the
other pods. Each pod consumes some queues over Upstash REST (through the faulty front) and the others over the
Redis protocol (through the reply-delaying proxy), so every family is served over both transports while two
pods run.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import requests

from local.redis_server import RedisServer

from ..conftest import fake_fleet_env, rig_env
from ..faults import SupabaseFront
from ..fleet import FAKE_HANDLER, FAKE_QUEUES, Fleet, free_ports

#: Which workers of each pod speak Upstash REST (the others: the Redis protocol).
REST_KINDS = {"a": frozenset({"sdxl", "wan"}), "b": frozenset({"chat"})}

#: Small timeouts and budgets, so that a fault is seen, handled and recovered from within seconds.
SOAK_FLEET_ENV = {
    "REDIS_TIMEOUT_SECONDS": "1",          # a SIGSTOPped Redis or a held REST reply outlasts the client
    "CALLBACK_TIMEOUT_SECONDS": "2",
    "CALLBACK_RETRY_SECONDS": "6",         # a callback outage longer than this goes to the outbox
    "FLEET_STABLE_SECONDS": "5",           # random kills are not the program's fault: never FATAL for them
    "FLEET_MAX_QUICK_FAILURES": "1000",
    "REGISTRATION_INTERVAL_SECONDS": "0",  # register once (against the stand-in, loopback only)
    "PUBLIC_BASE_URL": "http://127.0.0.1:{port}",
}


class Pod:
    """One fleet. ``name`` is its ``RUNPOD_POD_ID`` (the workers' ids start with it)."""

    def __init__(self, name: str, role: str, tmp: Path, redis_server: RedisServer, front: SupabaseFront,
                 redis_url: str, rest_url: str, rest_token: str):
        self.name = name
        self.role = role
        self.rest_kinds = REST_KINDS[role]
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        commands = {f"FLEET_COMMAND_{kind.upper()}": self._command(kind, queue, redis_url, rest_url, rest_token)
                    for kind, queue in FAKE_QUEUES.items()}
        env = rig_env(redis_server, front, free_ports(), tmp, **{**fake_fleet_env(tmp / "no-models"), **commands,
                                                                  **SOAK_FLEET_ENV, "RUNPOD_POD_ID": name})
        self.fleet = Fleet(env, tmp / "fleet.log")
        self.log_dir = tmp / "logs"
        self.up = False
        self._session = requests.Session()
        self._session.trust_env = False

    def _command(self, kind: str, queue: str, redis_url: str, rest_url: str, rest_token: str) -> str:
        transport = (f"-u REDIS_URL UPSTASH_REDIS_REST_URL={rest_url} UPSTASH_REDIS_REST_TOKEN={rest_token} "
                     if kind in self.rest_kinds else f"REDIS_URL={redis_url} ")
        return (f"env {transport}FAKE_QUEUE={queue} {{python}} -m workers {kind} --port {{port}} "
                f"--handler {FAKE_HANDLER}")

    def transport(self, kind: str) -> str:
        return "rest" if kind in self.rest_kinds else "redis"

    def start(self, timeout: float = 180.0) -> None:
        self.fleet.start(timeout)
        self.up = True

    def stop(self) -> int | None:
        """Warm stop of the whole pod (SIGTERM to its orchestrator): a pod drain."""
        self.up = False
        return self.fleet.stop()

    def close(self) -> list[int]:
        """Teardown: stop it if it runs, then SIGKILL whatever of it survived (by pid); returns those pids."""
        self.fleet.stop()
        return self.fleet.kill_leftovers()

    # ------------------------------------------------------------------ processes
    def leader(self, kind: str) -> int | None:
        """The pid of the worker program's process-group leader (the gunicorn master), if it runs now."""
        program = self.fleet.programs().get(kind)
        return program["pid"] if program and program["state"] == "RUNNING" else None

    def kill_worker_process(self, kind: str) -> list[int]:
        """SIGKILL the gunicorn worker process (the one that runs jobs) alone; gunicorn respawns it. Returns
        the pid killed ([] if the program is not running)."""
        leader = self.leader(kind)
        if leader is None:
            return []
        try:
            children = psutil.Process(leader).children()
        except psutil.NoSuchProcess:
            return []
        if not children:
            return []
        os.kill(children[0].pid, signal.SIGKILL)
        self.fleet.tree()
        return [children[0].pid]

    def signal_group(self, kind: str, sig: int) -> list[int]:
        """``sig`` to the worker program's whole process group (SIGKILL: a crash; SIGINT: a cold stop).
        Returns the group's pids, leader first ([] if the program is not running)."""
        leader = self.leader(kind)
        if leader is None:
            return []
        try:
            group = [leader, *(c.pid for c in psutil.Process(leader).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
        self.fleet.tree()
        try:
            os.killpg(leader, sig)
        except ProcessLookupError:
            return []
        return group

    def pids(self) -> list[int]:
        """Every process of this pod now (the orchestrator first)."""
        return [p.pid for p in self.fleet.tree()]

    def busy_kinds(self) -> list[str]:
        """The model workers of this pod running a job now (their ``/status``), in a fixed order."""
        busy = []
        for kind in FAKE_QUEUES:
            try:
                if self._session.get(f"{self.fleet.url(kind)}/status", timeout=2).json().get("busy"):
                    busy.append(kind)
            except (requests.RequestException, ValueError):
                continue
        return busy

    def programs(self) -> dict[str, dict]:
        return self.fleet.programs()

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("orchestrator.log*"))

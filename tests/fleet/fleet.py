"""The whole fleet as one process tree: ``python -m orchestrator`` started on free ports, watched through its
status port, crashed on purpose, and stopped so that nothing of it survives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests

from common import topology
from local import proctree
from local.net import free_port

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = topology.PROGRAM_ORDER
PORT_VARIABLES = {**topology.PORT_VARIABLES, "status": "ORCHESTRATOR_STATUS_PORT"}
FAKE_HANDLER = "tests.fakes.handlers:create_handler"
FAKE_QUEUES = {"sdxl": "sdxl_queue", "chat": "chat_queue", "wan": "wan_queue"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_ports() -> dict[str, int]:
    chosen: dict[str, int] = {}
    while len(set(chosen.values())) < len(PORT_VARIABLES):
        chosen = {name: free_port() for name in PORT_VARIABLES}
    return chosen


def fake_worker_commands() -> dict[str, str]:
    """``FLEET_COMMAND_<KIND>``: the real worker process (gunicorn, job loop, HTTP) with the fast fake handler
    from tests/fakes on the kind's own queue. ``{python}`` and ``{port}`` are filled in by orchestrator/fleet.py."""
    return {f"FLEET_COMMAND_{kind.upper()}":
            f"env FAKE_QUEUE={queue} {{python}} -m workers {kind} --port {{port}} --handler {FAKE_HANDLER}"
            for kind, queue in FAKE_QUEUES.items()}


def base_env(ports: dict[str, int], log_dir: Path, **extra: str) -> dict[str, str]:
    """The orchestrator's environment: nothing inherited but the basics, fast supervision, loopback only."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "HF_HOME")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "LOG_DIR": str(log_dir), "MEMORY_PROBE": "capacity", "MEMORY_CAPACITY_GB": "80", "DEVICE": "cpu",
        "FLEET_BACKOFF_BASE_SECONDS": "0.2", "FLEET_BACKOFF_MAX_SECONDS": "2", "FLEET_HEALTH_INTERVAL_SECONDS": "1",
        "FLEET_UNHEALTHY_RESTART_CHECKS": "60",  # a 2-core CI box can be slow to answer /health under load
        "FLEET_STOP_GRACE_SECONDS": "5", "FLEET_KILL_AFTER_SECONDS": "5", "FLEET_MAX_QUICK_FAILURES": "10",
        "WORKER_HEARTBEAT_TTL_SECONDS": "3", "QUEUE_POLL_MIN_SECONDS": "0.05", "QUEUE_POLL_MAX_SECONDS": "0.5",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    env.update({PORT_VARIABLES[name]: str(port) for name, port in ports.items()})
    env.update(extra)
    return env


class Fleet:
    """One ``python -m orchestrator`` and everything it spawns. Output goes to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.status_url = f"http://127.0.0.1:{env['ORCHESTRATOR_STATUS_PORT']}/status"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}  # every process of the tree ever observed (pid → handle)
        self._session = requests.Session()
        self._session.trust_env = False

    def url(self, program: str) -> str:
        return f"http://127.0.0.1:{self.env[PORT_VARIABLES[program]]}"

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 120.0) -> Fleet:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_running(timeout)
        return self

    def status(self) -> dict | None:
        try:
            answer = self._session.get(self.status_url, timeout=5)
        except requests.RequestException:
            return None
        return answer.json() if answer.status_code == 200 else None

    def programs(self) -> dict[str, dict]:
        document = self.status() or {"programs": []}
        return {p["name"]: p for p in document["programs"]}

    def wait_running(self, timeout: float) -> dict[str, dict]:
        def running():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the orchestrator exited with {self.proc.returncode}:\n{self.log_tail()}")
            programs = self.programs()
            return programs if programs and all(p["state"] == "RUNNING" for p in programs.values()) else None
        try:
            programs = wait_for(running, timeout, "every program RUNNING", interval=0.25)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        self.tree()
        return programs

    def tree(self) -> list[psutil.Process]:
        """The orchestrator and all its descendants now (each remembered in ``seen``)."""
        return proctree.tree(self.proc.pid if self.proc is not None else None, self.seen)

    def survivors(self) -> list[psutil.Process]:
        """Processes of this fleet (ever seen) that still run; a zombie counts as gone."""
        return proctree.survivors(self.seen)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the orchestrator (warm stop of the whole fleet); returns its exit status."""
        if self.proc is None:
            return None
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill_leftovers(self) -> list[int]:
        """Last resort at teardown: SIGKILL the processes of this fleet (by pid) that are still running."""
        left = self.survivors()
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in left]

    # ------------------------------------------------------------------ faults
    def crash(self, program: str) -> list[int]:
        """SIGKILL the program's whole process group (gunicorn master and worker): a hard crash. Returns the
        pids that were killed."""
        leader = self.programs()[program]["pid"]
        assert leader, f"{program} has no process"
        try:
            group = [leader, *(c.pid for c in psutil.Process(leader).children(recursive=True))]
        except psutil.NoSuchProcess:
            group = [leader]
        os.killpg(leader, signal.SIGKILL)
        return group

    def wait_restarted(self, program: str, old_pid: int, timeout: float = 60.0) -> dict:
        def restarted():
            p = self.programs().get(program)
            return p if p and p["state"] == "RUNNING" and p["pid"] not in (None, old_pid) else None
        found = wait_for(restarted, timeout, f"{program} restarted by the orchestrator", interval=0.2)
        self.tree()
        return found

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

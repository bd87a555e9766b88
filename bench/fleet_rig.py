"""The processes of a fleet run: redis-server, the Supabase stand-in, ``python -m orchestrator`` and a GPU ballast.

Everything listens on 127.0.0.1 on free ports. The orchestrator and the ballast die with this process
(``PR_SET_PDEATHSIG``) and every process of the fleet's tree ever seen is remembered, so :meth:`Orchestrated.stop`
can SIGKILL whatever outlived a warm stop. ``redis_binary`` finds the server to run: ``--redis-server`` /
``REDIS_SERVER_BIN``, else ``.redisbin/redis-server`` in the repository (a carried binary), else PATH.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from common import topology
from local import proctree
from local.net import free_port

ROOT = Path(__file__).resolve().parents[1]
PORT_VARIABLES = {**topology.PORT_VARIABLES, "status": "ORCHESTRATOR_STATUS_PORT"}
#: Variables of the calling shell that would change the fleet under test: never inherited.
DROPPED_PREFIXES = ("UPSTASH_", "SUPABASE_", "REDIS_", "RUNPOD_", "PUBLIC_BASE_URL", "FLEET_", "MEMORY_", "GPU_",
                    "SDXL_", "WAN_", "QWEN_", "CHAT_", "WORKER_", "STORAGE_", "REFERENCE_", "QUEUE_", "JOB_",
                    "CALLBACK_", "REGISTRATION_", "ROUTER_", "ORCHESTRATOR_", "LOG_", "DEVICE", "TORCH_COMPILE",
                    "CUDA_GRAPHS", "ALLOW_ANONYMOUS")
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_us() -> None:  # preexec: between fork and exec, two system calls only
    _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass(frozen=True)
class Keys:
    service: str = field(default_factory=lambda: "svc-" + secrets.token_hex(8))
    callback: str = field(default_factory=lambda: "cb-" + secrets.token_hex(8))
    client: str = field(default_factory=lambda: "client-" + secrets.token_hex(8))
    admin: str = field(default_factory=lambda: "admin-" + secrets.token_hex(8))


def redis_binary(explicit: str | None) -> tuple[str, str]:
    """(path, how it was found) of the redis-server to run; raises SystemExit when there is none."""
    for path, how in ((explicit, "--redis-server"), (os.environ.get("REDIS_SERVER_BIN"), "REDIS_SERVER_BIN"),
                      (str(ROOT / ".redisbin" / "redis-server"), ".redisbin"),
                      (shutil.which("redis-server"), "PATH")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path), how
    raise RuntimeError("no redis-server: pass --redis-server PATH, set REDIS_SERVER_BIN, carry .redisbin/ or "
                     "put redis-server on PATH")


def expose_redis(binary: str, scratch: Path) -> str:
    """Make ``binary`` the ``redis-server`` that ``local.redis_server`` finds on PATH; its version."""
    shim = scratch / "redis-bin"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "redis-server"
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(binary)
    os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()[:200]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"--version failed: {type(exc).__name__}"


def fleet_env(settings: Mapping[str, str], ports: Mapping[str, int]) -> dict[str, str]:
    """The orchestrator's environment: this shell's minus anything fleet-related, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.update({PORT_VARIABLES[name]: str(port) for name, port in ports.items()})
    env.update(settings)
    return env


def free_ports() -> dict[str, int]:
    chosen: dict[str, int] = {}
    while len(set(chosen.values())) < len(PORT_VARIABLES):
        chosen = {name: free_port() for name in PORT_VARIABLES}
    return chosen


class Http:
    """requests on loopback (never through a proxy), JSON in and out, errors as values."""

    def __init__(self, admin_key: str):
        self.session = requests.Session()
        self.session.trust_env = False
        self.admin = {"Authorization": f"Bearer {admin_key}"}

    def get(self, url: str, timeout: float = 10.0) -> tuple[int | None, Any]:
        return self._call("GET", url, None, {}, timeout)

    def post(self, url: str, body: Any = None, admin: bool = False, timeout: float = 60.0) -> tuple[int | None, Any]:
        return self._call("POST", url, body, self.admin if admin else {}, timeout)

    def delete(self, url: str, timeout: float = 10.0) -> tuple[int | None, Any]:
        return self._call("DELETE", url, None, self.admin, timeout)

    def _call(self, method: str, url: str, body: Any, headers: dict, timeout: float) -> tuple[int | None, Any]:
        try:
            answer = self.session.request(method, url, json=body, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            return None, {"error": type(exc).__name__}
        try:
            return answer.status_code, answer.json()
        except ValueError:
            return answer.status_code, {"text": answer.text[:300]}


class Orchestrated:
    """One ``python -m orchestrator`` (its own session, dies with us) and the processes it spawns."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.ports = {name: int(env[var]) for name, var in PORT_VARIABLES.items()}
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}
        self.http = Http(env.get("WORKER_ADMIN_KEY", ""))

    def url(self, program: str) -> str:
        return f"http://127.0.0.1:{self.ports[program]}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_us)

    def status(self) -> dict[str, dict]:
        code, body = self.http.get(self.url("status") + "/status", timeout=5)
        if code != 200 or not isinstance(body, dict):
            return {}
        return {p["name"]: p for p in body.get("programs", [])}

    def wait_running(self, timeout: float) -> dict[str, dict]:
        """Every program RUNNING (its /health answered 200); raises RuntimeError with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        programs: dict[str, dict] = {}
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the orchestrator exited ({self.proc and self.proc.returncode}):\n"
                                   + self.log_tail())
            programs = self.status()
            self.tree()
            fatal = [n for n, p in programs.items() if p["state"] == "FATAL"]
            if fatal:
                raise RuntimeError(f"FATAL: {', '.join(fatal)}:\n{self.log_tail()}")
            if programs and all(p["state"] == "RUNNING" for p in programs.values()):
                return programs
            time.sleep(0.5)
        states = {n: p["state"] for n, p in programs.items()}
        raise RuntimeError(f"not every program RUNNING within {timeout:.0f} s ({states}):\n{self.log_tail()}")

    def tree(self) -> list[psutil.Process]:
        """The orchestrator and all its descendants now (each remembered in ``seen``)."""
        return proctree.tree(self.proc.pid if self.proc is not None else None, self.seen)

    def survivors(self) -> list[psutil.Process]:
        """Processes of this fleet (ever seen) that still run; a zombie counts as gone."""
        return proctree.survivors(self.seen)

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM (warm stop), wait, then SIGKILL what is left of the tree. Returns what happened."""
        if self.proc is None:
            return {"started": False}
        self.tree()
        began = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = []
        for process in self.survivors():
            try:
                process.kill()
                killed.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        return {"exit_code": self.proc.returncode, "stop_s": round(time.monotonic() - began, 1),
                "killed_leftovers": killed, "processes_seen": len(self.seen)}

    def log_tail(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class Ballast:
    """``python -m bench.ballast`` on one physical GPU; :meth:`command` sends a line and reads the answer."""

    def __init__(self, device: str, log_path: Path):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device,
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.ballast"], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True, preexec_fn=_die_with_us)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="ballast-out", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def answer(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the ballast exited with {self.proc.returncode}") from None
                continue
            if line.startswith("{"):
                return json.loads(line)
        raise TimeoutError(f"the ballast did not answer within {timeout:.0f} s")

    def command(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def scratch_dir(parent: Path | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=parent))

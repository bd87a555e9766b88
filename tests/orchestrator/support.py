"""Test support shared by the orchestrator, memory manager and registration tests: fake programs, waiting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from common.topology import PORT_VARIABLES, PROGRAM_ORDER
from local.net import free_port

FAKE = Path(__file__).with_name("fake_program.py")
ROOT = Path(__file__).resolve().parents[2]


def fake_command(name: str, events: Path, *flags: str, port: int | str = "{port}") -> tuple[str, ...]:
    return (sys.executable, str(FAKE), "--name", name, "--port", str(port), "--events", str(events), *flags)


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event line (a line a program is writing right now, with no newline yet, is left out)."""
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead: its parent may be gone, so nobody reaps it here)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_ports() -> dict[str, int]:
    """A distinct free loopback port for every program of common.topology and for the status page."""
    names = (*PROGRAM_ORDER, "status")
    chosen: dict[str, int] = {}
    while len(set(chosen.values())) < len(names):
        chosen = {n: free_port() for n in names}
    return chosen


def fleet_env(ports: dict[str, int], tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment for ``python -m orchestrator`` on free ports, with nothing secret or remote in it.

    ``ports`` names programs (common.topology) and ``status``; a program left out keeps its default port, which
    is fine only when FLEET_PROGRAMS does not run it."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"PYTHONPATH": str(ROOT), "LOG_DIR": str(tmp_path / "logs"), "GPU_COUNT": "0",
                "ORCHESTRATOR_STATUS_PORT": str(ports["status"])})
    env.update({variable: str(ports[name]) for name, variable in PORT_VARIABLES.items() if name in ports})
    env.update(extra)
    return env


def status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "status", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def all_running(env: dict[str, str]) -> dict | None:
    result = status(env, "--json")
    if result.returncode != 0:
        return None
    document = json.loads(result.stdout)
    return document if all(p["state"] == "RUNNING" for p in document["programs"]) else None

"""The running orchestrator's status, served on a loopback-only port, and the ``status`` command that reads it.

``GET http://127.0.0.1:<ORCHESTRATOR_STATUS_PORT>/status`` (default 7871) → JSON: every program's state, pid,
uptime, restarts, health. The server binds 127.0.0.1 only (never 0.0.0.0) and is read-only, so it needs no
key. ``python -m orchestrator status`` prints it as a table (``--json`` for the raw document).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests
from flask import Flask

from common.background import LOOPBACK
from common.http import create_base_app


def create_app(status: Callable[[], dict[str, Any]]) -> Flask:
    def health() -> tuple[bool, dict[str, Any]]:
        return True, {}

    app = create_base_app("orchestrator", health)

    @app.get("/status")
    def status_route():
        return status()

    return app


def fetch(port: int, timeout: float = 5.0) -> dict[str, Any] | None:
    session = requests.Session()
    session.trust_env = False
    try:
        response = session.get(f"http://{LOOPBACK}:{port}/status", timeout=timeout)
        response.raise_for_status()
        return response.json()
    except (requests.RequestException, ValueError):
        return None


def render(status: dict[str, Any]) -> str:
    columns = ("PROGRAM", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "HEALTH", "PORT", "GPU")
    rows = [columns]
    for p in status.get("programs", []):
        rows.append((p["name"], p["state"], str(p["pid"] or "-"), _duration(p["uptime_seconds"]),
                     str(p["restarts"]), _last_exit(p), p["health"], str(p["port"]), p["gpu"] or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"orchestrator up {_duration(status.get('uptime_seconds'))}"
                 + (", stopping" if status.get("stopping") else ""))
    for p in status.get("programs", []):
        if p["state"] in ("FATAL", "BACKOFF", "STOPPING") and p.get("reason"):
            lines.append(f"{p['name']}: {p['reason']}")
    return "\n".join(lines)


def _last_exit(program: dict[str, Any]) -> str:
    """``78 CONFIG_ERROR``, ``SIGKILL``, ``0``, or ``-`` (never exited)."""
    code, name = program.get("last_exit"), program.get("last_exit_name")
    if code is None:
        return "-"
    if code < 0:
        return name or f"signal {-code}"
    return f"{code} {name}" if name else str(code)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"

"""A loopback HTTP server that answers each POST with the next scripted (status, headers), then 200
``{"success": true}``, and records every request: for retry policies (``Retry-After``, jitter, budgets)."""
from __future__ import annotations

import threading

from flask import Flask, Response

from local.net import BackgroundServer


class ScriptedServer(BackgroundServer):
    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        app = Flask("scripted")

        @app.post("/<path:path>")
        def answer(path: str) -> Response:
            with self._lock:
                self.requests.append("/" + path)
                status, headers = self.script.pop(0) if self.script else (200, {})
            body = '{"success": true}' if status < 300 else '{"error": "scripted"}'
            return Response(body, status=status, headers=headers, mimetype="application/json")

        super().__init__(app, name="scripted")

    def answer(self, n: int, status: int, **headers: str) -> None:
        """The next ``n`` requests get ``status`` with ``headers`` (``Retry_After`` → ``Retry-After``)."""
        with self._lock:
            self.script.extend([(status, {k.replace("_", "-"): v for k, v in headers.items()})] * n)


class FakeTime:
    """A clock that only moves when slept on: the policy's real waits, recorded, without real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

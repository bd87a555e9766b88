"""Fixtures of the ops page tests: loopback stand-ins for the sources the router's collector asks."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from flask import Flask

from common.background import BackgroundServer
from orchestrator.program import Backoff, ProgramSpec
from orchestrator.status import create_app as status_app
from orchestrator.supervisor import Supervisor
from tests.core.conftest import rig  # noqa: F401 - the job-runtime rig the journal tests use

PROMPT = "SECRET-PROMPT a lighthouse at dusk"


class ChatWorker:
    """``GET /status`` as the chat worker answers it, with engine counters a test moves forward (and a field
    holding user text, which must never reach the ops page)."""

    def __init__(self) -> None:
        self.engine = {"running": True, "active": 0, "waiting": 0, "tokens": 0, "completed": 0, "first_tokens": 0,
                       "ttft_seconds_total": 0.0}
        self._lock = threading.Lock()
        app = Flask("chat-standin")

        @app.get("/status")
        def status():
            with self._lock:
                return {"ready": True, "uptime_s": 5.0, "progress": {"message": PROMPT},
                        "model": {"loaded_models": ["qwen_instruct"], "engine": dict(self.engine),
                                  "last_prompt": PROMPT}}

        self.server = BackgroundServer(app)

    def advance(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                self.engine[key] += value


@pytest.fixture
def chat_worker() -> Iterator[ChatWorker]:
    worker = ChatWorker()
    yield worker
    worker.server.stop()


@pytest.fixture
def orchestrator_status() -> Iterator[BackgroundServer]:
    """The orchestrator's real status server over a real supervisor of three programs (never started)."""
    specs = [ProgramSpec(name, ("true",), port) for name, port in (("router", 7860), ("chat", 7861), ("wan", 7862))]
    supervisor = Supervisor(specs, Backoff(), stop_grace=1, kill_after=1, health_interval=1)
    server = BackgroundServer(status_app(supervisor.status))
    yield server
    server.stop()

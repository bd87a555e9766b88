"""Chat test fixtures: the tiny demo Qwen models, one resident ChatHandler, and its real Flask app served
over loopback HTTP (werkzeug, threaded), built the way the service builds it: ``create_base_app`` + the chat
Blueprint (``create_routes(handler, residency)``) on a real ``Residency``; ``chat_worker`` starts a real
``python -m workers chat`` process (gunicorn) on the tiny models, for the faults that live in the process
(sockets, eviction)."""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every load below must work without the hub

import pytest
import requests
import torch

from common.http import create_base_app
from common.settings import Secret
from local.net import BackgroundServer, free_port
from tests.procs import WorkerProcess
from workers.chat import create_handler, create_routes
from workers.chat.generation import GenerationRequest
from workers.chat.handler import ChatHandler
from workers.chat.settings import ChatSettings
from workers.core.job import Job, decode
from workers.core.memory_client import MemoryClient
from workers.core.metrics import Metrics
from workers.core.residency import Residency
from workers.core.state import Lifecycle, WorkerState

WAN_KEY = "test-wan-key"
CHAT_KEY = "test-chat-key"
ADMIN_KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {CHAT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Served:
    """``handler``'s routes mounted as the worker service mounts them, with the worker's own ``Residency``: a
    lifecycle that starts ready (the handler is set up) and a memory manager address nothing listens on (every
    reservation answers "unavailable", which still loads)."""

    def __init__(self, handler: ChatHandler):
        self.lifecycle = Lifecycle(WorkerState.READY)
        memory = MemoryClient(f"http://127.0.0.1:{free_port()}", "chat", 0, None)
        self.residency = Residency(handler, memory, self.lifecycle, handler.kind)
        app = create_base_app("chat-worker", lambda: (handler.engine.running, {}), Metrics())
        app.register_blueprint(create_routes(handler, self.residency))
        self.server = BackgroundServer(app, name="chat-test-http")
        self.url = self.server.url
        self.session = requests.Session()

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = AUTH, **kwargs: Any):
        return self.session.post(self.url + path, json=body, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, headers: dict[str, str] | None = AUTH):
        return self.session.get(self.url + path, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.stop()


def chat_settings(models: dict[str, Path], **overrides: Any) -> ChatSettings:
    values: dict[str, Any] = dict(qwen_instruct_path=models["qwen_instruct"], qwen_base_path=models["qwen_base"],
                                  device="cpu", wan_worker_api_key=Secret(WAN_KEY),
                                  chat_worker_api_key=Secret(CHAT_KEY), chat_max_context_tokens=4096)
    values.update(overrides)
    return ChatSettings(**values)


def chat_process_env(models: dict[str, Path], **extra: str) -> dict[str, str]:
    """The environment of a chat worker process on the tiny models: CPU, HTTP only (no queue), the test keys,
    a memory manager address nothing listens on (unless ``MEMORY_MANAGER_URL`` is given)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UPSTASH_", "REDIS_", "SUPABASE_", "CHAT_", "QWEN_", "MEMORY_"))}
    env.update({"QWEN_INSTRUCT_PATH": str(models["qwen_instruct"]), "QWEN_BASE_PATH": str(models["qwen_base"]),
                "DEVICE": "cpu", "CHAT_MAX_CONTEXT_TOKENS": "4096", "CHAT_WORKER_API_KEY": CHAT_KEY,
                "WAN_WORKER_API_KEY": WAN_KEY, "WORKER_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "MEMORY_MANAGER_URL": f"http://127.0.0.1:{free_port()}", **extra})
    return env


@pytest.fixture
def chat_worker(demo_models, tmp_path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``python -m workers chat`` (gunicorn, the slowed handler of slow.py) with extra env; waits for
    /health 200. The log is kept in tmp_path and printed when a test fails."""
    started: list[WorkerProcess] = []

    def start(**extra: str) -> WorkerProcess:
        log = tmp_path / f"chat-worker-{len(started)}.log"
        worker = WorkerProcess(chat_process_env(demo_models, **extra), kind="chat",
                               handler="tests.chat.slow:create_handler", log_path=log)
        started.append(worker)
        return worker.wait_healthy(timeout=180)

    yield start
    for worker in started:
        worker.close()
    for log in sorted(tmp_path.glob("chat-worker-*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def make_job(type: str, config: dict[str, Any] | None = None, prompt: str = "", **top: Any) -> Job:
    body = {"id": "job-1", "type": type, "user_id": "user-1", "prompt": prompt, "config": config, **top}
    return decode(json.dumps([json.dumps(body)]))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny models are all overhead: on a shared 2-core machine, torch's intra-op thread pool only adds
    contention (a 64-wide matmul takes ~1 ms with 2 threads under load, ~20 us with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def settings(demo_models) -> ChatSettings:
    return chat_settings(demo_models)


@pytest.fixture(scope="session")
def handler(settings) -> Iterator[ChatHandler]:
    handler = create_handler(settings)
    handler.setup()
    yield handler
    handler.close()


@pytest.fixture(scope="session")
def served(handler) -> Iterator[Served]:
    served = Served(handler)
    yield served
    served.stop()


@pytest.fixture
def fresh_handler(demo_models) -> Iterator[Any]:
    """A separate handler (its own engine and models), for tests that unload or reconfigure."""
    made: list[ChatHandler] = []

    def make(**overrides: Any) -> ChatHandler:
        handler = create_handler(chat_settings(demo_models, **overrides))
        handler.setup()
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


def drive(batch: Any, plan: dict[int, list[GenerationRequest]], on_step: Callable[[Any], None] = lambda b: None
          ) -> list[list[int]]:
    """The engine's round (admit between steps, step, drop finished rows) on one batch, deterministically:
    each request's tokens, in the plan's order."""
    requests = [r for step in sorted(plan) for r in plan[step]]
    done: dict[int, list[int]] = {}
    step = 0
    with torch.inference_mode():
        while len(done) < len(requests):
            if plan.get(step):
                batch.admit(plan[step])
                settle(batch, done)
            if getattr(batch, "pending", None):   # chunked prefill: the engine advances it before each step
                batch.advance()
            if batch.rows:
                on_step(batch)
                batch.step()
                settle(batch, done)
            step += 1
            assert step < 500
    return [done[id(r)] for r in requests]


def settle(batch: Any, done: dict[int, list[int]]) -> None:
    finished = [row for row in batch.rows if row.finish is not None]
    for row in finished:
        done[id(row.request)] = list(row.tokens)
    batch.remove(finished)


def raw_post(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send one HTTP request on a raw socket and return it unread (the caller closes it: a client giving up)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def engine_stats(url: str) -> dict[str, Any]:
    """A running chat worker's generation-loop counters (``/worker/info``)."""
    return requests.get(f"{url}/worker/info", headers=AUTH, timeout=10).json()["engine"]


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()

"""Chat after the memory manager evicts it (review #14, chat half): the next /chat, /enhance or /v1/* request
reloads the model through the worker's ``Residency`` (reserve, then load) under its GPU lock, with a bounded wait,
instead of answering 503 "no chat model is loaded" until the manager's own reload; the lazy ``qwen_base`` load
reserves first too, for its weights and the KV cache the engine allocates for it.

Process tests: a real ``python -m workers chat`` (gunicorn, tiny models on CPU) and a real ``python -m
memory_manager`` (capacity probe) on loopback. The bounded wait on a held GPU lock is tested on the routes
in-process (the lock cannot be held from outside a process without a running job).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from local.net import free_port
from tests.procs import ROOT
from workers.chat.models import ModelName
from workers.chat.slots import SlotCache

from .conftest import ADMIN, ADMIN_KEY, AUTH, Served

MESSAGES = [{"role": "user", "content": "a cat on a chair"}]


class ManagerProcess:
    """``python -m memory_manager`` on loopback with the capacity probe, chat's table size ``chat_gb`` and the
    chat worker at ``chat_port``; no ticks during a test (no sweep, no predictive reload to race)."""

    def __init__(self, port: int, chat_port: int, capacity_gb: float, chat_gb: float, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMORY_", "CHAT_", "REDIS_", "UPSTASH_"))}
        env.update({"MEMORY_PROBE": "capacity", "MEMORY_CAPACITY_GB": str(capacity_gb),
                    "MEMORY_SAFETY_MARGIN_GB": "1", "MEMORY_SIZES_GB": f"chat:{chat_gb}",
                    "MEMORY_TICK_SECONDS": "3600", "MEMORY_MANAGER_PORT": str(port), "CHAT_PORT": str(chat_port),
                    "WORKER_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1"})
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "memory_manager", "--port", str(port)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, "the memory manager did not start"
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)

    def reservations(self) -> list[dict[str, Any]]:
        return requests.get(f"{self.url}/memory/status", timeout=10).json()["reservations"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def fleet(chat_worker, tmp_path) -> Iterator[Any]:
    """Start a chat worker whose memory manager comes up after it (so its boot reservation does not depend on
    the manager) and then the manager: ``fleet(capacity_gb, chat_gb) -> (worker, manager)``."""
    managers: list[ManagerProcess] = []

    def start(capacity_gb: float = 48.0, chat_gb: float = 1.0) -> tuple[Any, ManagerProcess]:
        port = free_port()
        worker = chat_worker(MEMORY_MANAGER_URL=f"http://127.0.0.1:{port}", TEST_CHAT_STEP_DELAY_SECONDS="0")
        managers.append(ManagerProcess(port, worker.port, capacity_gb, chat_gb, tmp_path / "manager.log"))
        return worker, managers[-1]

    yield start
    for manager in managers:
        manager.close()


def evict(worker: Any) -> None:
    """What the memory manager does to make room: unload everything (admin key)."""
    response = requests.post(f"{worker.url}/memory/unload", params={"which": "all"}, json={"which": "all"},
                             headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    assert loaded_models(worker) == []


def loaded_models(worker: Any) -> list[str]:
    return requests.get(f"{worker.url}/worker/info", headers=AUTH, timeout=10).json()["loaded_models"]


def chat(worker: Any, path: str = "/chat", **extra: Any) -> requests.Response:
    return requests.post(f"{worker.url}{path}", json={"messages": MESSAGES, "max_tokens": 4, **extra},
                         headers=AUTH, timeout=60)


def test_an_evicted_chat_reloads_on_the_next_request_with_a_reservation(fleet):
    """Today every call answers 503 "no chat model is loaded" after the eviction, while /health says healthy."""
    worker, manager = fleet()
    for path in ("/chat", "/enhance", "/v1/chat/completions"):
        evict(worker)
        assert [r for r in manager.reservations() if r["worker"] == "chat"] == []
        response = chat(worker, path)
        assert response.status_code == 200, (path, response.text)
        assert loaded_models(worker) == ["qwen_instruct"]
        held = [r for r in manager.reservations() if r["worker"] == "chat"]
        assert [(r["label"], r["gb"]) for r in held] == [("model", 1.0)], held
    assert requests.get(f"{worker.url}/health", timeout=5).status_code == 200


def test_the_lazy_base_load_reserves_its_weights_and_kv_cache_first(fleet, demo_models):
    """Today qwen_base loads inside the request with no reservation at all."""
    worker, manager = fleet()
    response = chat(worker, model="qwen_base")
    assert response.status_code == 200, response.text
    assert response.json()["model_info"]["model"] == "qwen_base"
    base = [r for r in manager.reservations() if r["label"] == "qwen_base"]
    assert len(base) == 1 and base[0]["worker"] == "chat"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(demo_models["qwen_base"], local_files_only=True)
    weights = sum(f.stat().st_size for f in Path(demo_models["qwen_base"]).glob("*.safetensors"))
    kv = SlotCache.bytes_needed(config, 16, 4096, torch.float32)   # CHAT_MAX_BATCH default, the test context
    assert base[0]["gb"] * 2 ** 30 >= weights + kv
    evict(worker)   # unloading base releases its reservation
    assert [r for r in manager.reservations() if r["label"] == "qwen_base"] == []


def test_a_refused_reservation_is_a_503_with_retry_after_and_nothing_loads(fleet):
    """The manager cannot fit chat (1.5 GB, 1 GB kept free, chat needs 1 GB): the request is refused at once
    with a reason and Retry-After, and the model stays unloaded; a base request falls back to nothing."""
    worker, manager = fleet(capacity_gb=1.5, chat_gb=1.0)
    evict(worker)
    response = chat(worker)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert "GPU memory" in response.json()["error"]
    assert loaded_models(worker) == []


def test_a_base_request_falls_back_to_instruct_when_its_reservation_is_refused(fleet):
    """chat's 1 GB fits a 2 GB GPU with 1 GB kept free; qwen_base's reservation on top does not: the request is
    answered by the loaded instruct model (reported as a fallback) and base is not loaded."""
    worker, manager = fleet(capacity_gb=2.0, chat_gb=1.0)
    evict(worker)
    assert chat(worker).status_code == 200     # chat's own reservation: 1 GB, all there is
    response = chat(worker, model="qwen_base")
    assert response.status_code == 200, response.text
    info = response.json()["model_info"]
    assert info["model"] == "qwen_instruct" and info["fallback"] is True
    assert loaded_models(worker) == ["qwen_instruct"]


def reloads(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reloads a request made (the residency logs each one)."""
    return [r.getMessage() for r in caplog.records if "reloading" in r.getMessage()]


def test_an_evicted_chat_waits_a_bounded_time_for_the_gpu_lock(fresh_handler, caplog):
    """A request after an eviction waits at most CHAT_RELOAD_WAIT_SECONDS for the GPU lock (a job or another
    reload holds it), then answers 503 + Retry-After; once the lock is free the next request reloads."""
    caplog.set_level(logging.INFO, logger="workers.core.residency")
    handler = fresh_handler(chat_reload_wait_seconds=0.5)
    served = Served(handler)
    residency = served.residency
    try:
        with residency.gpu_lock:   # as the service's /memory/unload does
            residency.unload("all")
        assert residency.unloaded
        with residency.gpu_lock:
            began = time.monotonic()
            response = served.post("/chat", {"messages": MESSAGES, "max_tokens": 4})
            waited = time.monotonic() - began
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1 and waited >= 0.5
        assert handler.status()["loaded_models"] == []
        response = served.post("/chat", {"messages": MESSAGES, "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert handler.status()["loaded_models"] == ["qwen_instruct"] and not residency.unloaded
        assert reloads(caplog) == ["chat was unloaded (evicted); reloading instruct for a request"]
    finally:
        served.stop()


def test_concurrent_requests_after_an_eviction_reload_once(fresh_handler, caplog):
    caplog.set_level(logging.INFO, logger="workers.core.residency")
    handler = fresh_handler()
    served = Served(handler)
    residency = served.residency
    try:
        with residency.gpu_lock:
            residency.unload("all")
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(
            served.post("/chat", {"messages": MESSAGES, "max_tokens": 4}).status_code)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * 4 and len(reloads(caplog)) == 1 and not residency.unloaded
    finally:
        served.stop()


def test_default_models_are_what_setup_loads(fresh_handler, demo_models):
    assert fresh_handler().default_models() == "instruct"
    assert fresh_handler(qwen_base_preload=True).default_models() == "all"
    assert fresh_handler(qwen_instruct_path=None).default_models() == "base"
    assert ModelName.INSTRUCT.short == "instruct"


def test_the_reload_wait_counts_against_the_request_deadline(fresh_handler):
    """A request's deadline starts when it arrives (the RunPod proxy cuts at 100 s): with the GPU lock held past
    CHAT_REQUEST_TIMEOUT_SECONDS, the reload's wait ends at that deadline (503) instead of waiting the longer
    CHAT_RELOAD_WAIT_SECONDS and then starting the full request wait."""
    handler = fresh_handler(chat_reload_wait_seconds=5.0, chat_request_timeout_seconds=1.0)
    served = Served(handler)
    residency = served.residency
    try:
        with residency.gpu_lock:
            residency.unload("all")
        held = threading.Event()

        def hold_the_lock() -> None:
            with residency.gpu_lock:
                held.set()
                time.sleep(2.0)

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        held.wait(5)
        began = time.monotonic()
        response = served.post("/chat", {"messages": MESSAGES, "max_tokens": 4})
        waited = time.monotonic() - began
        holder.join()
        assert response.status_code == 503, response.text
        assert 0.9 <= waited < 1.8, waited
    finally:
        served.stop()

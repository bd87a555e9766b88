"""A real chat worker process (gunicorn, the tiny Qwen models on CPU): after one request its ``/metrics`` counts
the tokens generated, has one time-to-first-token observation for the model, and no active sequence left."""
from __future__ import annotations

import os

import requests

from local.net import free_port
from tests.procs import WorkerProcess

from .exposition import value

CHAT_KEY = "test-chat-key"


def chat_env(models) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UPSTASH_", "REDIS_", "SUPABASE_", "CHAT_", "QWEN_", "MEMORY_", "LOG_"))}
    env.update({"QWEN_INSTRUCT_PATH": str(models["qwen_instruct"]), "DEVICE": "cpu",
                "CHAT_MAX_CONTEXT_TOKENS": "4096", "CHAT_WORKER_API_KEY": CHAT_KEY, "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "MEMORY_MANAGER_URL": f"http://127.0.0.1:{free_port()}"})
    return env


def test_tokens_time_to_first_token_and_active_sequences(demo_models, tmp_path):
    worker = WorkerProcess(chat_env(demo_models), kind="chat", handler=None, log_path=tmp_path / "chat.log")
    try:
        worker.wait_healthy(timeout=180)
        answer = requests.post(worker.url + "/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 5, "temperature": 0},
                               headers={"Authorization": f"Bearer {CHAT_KEY}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        generated = answer.json()["tokens_generated"]
        text = requests.get(worker.url + "/metrics", timeout=5).text
    finally:
        worker.close()
    assert generated >= 1
    assert value(text, "worker_chat_tokens_generated_total") >= generated
    assert value(text, "worker_chat_time_to_first_token_seconds_count", model="qwen_instruct") == 1
    assert 0 < value(text, "worker_chat_time_to_first_token_seconds_sum", model="qwen_instruct") < 60
    assert value(text, "worker_chat_active_sequences") == 0
    assert value(text, "worker_chat_waiting_requests") == 0
    assert value(text, "worker_http_requests_total", endpoint="/chat", status="200") == 1

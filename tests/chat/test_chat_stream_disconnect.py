"""A streaming chat whose client goes away stops decoding (issue 16 §1), under gunicorn on real sockets: a real
``python -m workers chat`` process on the tiny demo Qwen with slowed decode steps (slow.py).

Two ways a stream learns its client left: a write of the next delta fails (tokens flowing), and, while no
token comes (the request waits in the line for a row), the request thread's peek at its socket each wait slice
(``ChatService._next``), since nothing is written then. The non-streaming case is in test_chat_isolation.py.
"""
from __future__ import annotations

import socket
import time
from typing import Any

import requests

from .conftest import AUTH, engine_stats, eventually, raw_post

POEM = "write a poem"   # the demo instruct model's greedy reply to this runs 300+ tokens without a stop


def open_stream(url: str, body: dict[str, Any]) -> socket.socket:
    """POST a streaming completion on a raw socket and return it unread (closing it = a client giving up)."""
    return raw_post(url, "/v1/chat/completions", {**body, "stream": True})


def long_request(max_tokens: int = 400) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": POEM}], "max_tokens": max_tokens, "temperature": 0}


def test_a_stream_whose_client_closes_mid_stream_stops_decoding(chat_worker):
    worker = chat_worker(TEST_CHAT_STEP_DELAY_SECONDS="0.05")
    sock = open_stream(worker.url, long_request())
    received = b""
    while received.count(b"data: ") < 5:   # the role chunk and a few deltas: tokens are flowing
        received += sock.recv(4096)
    assert b" 200 " in received.split(b"\r\n", 1)[0]
    sock.close()
    gone = time.monotonic()
    assert eventually(lambda: engine_stats(worker.url)["active"] == 0, 8), "the abandoned stream kept decoding"
    print(f"decoding stopped {time.monotonic() - gone:.2f} s after the client closed its socket")
    assert engine_stats(worker.url)["completed"] == 0
    ok = requests.post(f"{worker.url}/v1/chat/completions", json={**long_request(3), "stream": True}, headers=AUTH,
                       timeout=60)
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")


def test_a_stream_whose_client_leaves_while_it_waits_for_a_row_is_never_decoded(chat_worker):
    """One row (``CHAT_MAX_BATCH=1``) busy with a long /chat; a stream waits in the line, writing nothing, and its
    client closes. Without the peek it would be admitted once the row frees and decode until a write fails."""
    worker = chat_worker(TEST_CHAT_STEP_DELAY_SECONDS="0.05", CHAT_MAX_BATCH="1")
    busy = open_stream(worker.url, long_request(60))   # about 3 s of decoding
    assert eventually(lambda: engine_stats(worker.url)["active"] == 1, 30)
    waiting = open_stream(worker.url, long_request())
    assert eventually(lambda: engine_stats(worker.url)["waiting"] == 1, 10)
    waiting.recv(4096)   # the headers and the role chunk came; no token will until the row frees
    waiting.close()
    assert eventually(lambda: engine_stats(worker.url)["completed"] == 1, 30), "the busy request did not finish"
    time.sleep(1.0)   # the row is free: an admitted stream would be decoding now
    stats = engine_stats(worker.url)
    assert stats["active"] == 0 and stats["waiting"] == 0 and stats["completed"] == 1
    assert stats["tokens"] <= 60, f"{stats['tokens']} tokens: the abandoned stream was decoded"
    busy.close()

"""The fault injectors of tests/fleet/faults.py do what the soak relies on (real redis-server, real HTTP)."""
from __future__ import annotations

import json
import os
import time

import pytest
import redis
import requests

from local.supabase_standin import sign

from .faults import Mode, ReplyDelayProxy, SupabaseFront


def test_reply_delay_proxy_runs_the_command_but_the_reply_comes_too_late(redis_server, redis_client):
    proxy = ReplyDelayProxy(redis_server.port)
    try:
        client = redis.Redis.from_url(proxy.url, socket_timeout=0.5)
        assert client.rpush("q", "a") == 1                  # passes through while no window is open
        proxy.hold(1.5)
        with pytest.raises(redis.TimeoutError):
            client.rpush("q", "b")
        assert redis_client.lrange("q", 0, -1) == [b"a", b"b"]  # it ran on the server all the same
        assert proxy.held == 1
        proxy.release()
        assert client.llen("q") == 2                         # a new connection after the window works
        client.close()
    finally:
        proxy.stop()


def test_late_callbacks_reach_the_app_and_their_answers_come_after_the_caller_gave_up(supabase_standin):
    front = SupabaseFront(supabase_standin.url, identify_senders=True)
    body = json.dumps({"job_id": "j-late", "status": "completed", "worker_id": "pod-sdxl-0"}).encode()
    headers = {"Authorization": f"Bearer {supabase_standin.service_key}", "apikey": supabase_standin.service_key,
               "Content-Type": "application/json", "X-Callback-Signature": sign(body, supabase_standin.callback_secret)}
    try:
        front.set_mode(Mode.LATE)
        with pytest.raises(requests.Timeout):
            requests.post(f"{front.url}/functions/v1/job-callback", data=body, headers=headers, timeout=0.5)
        assert [c.raw for c in supabase_standin.callbacks("j-late")] == [body]
        time.sleep(0.2)   # the front may have begun the request after the client's clock did: answer well after
        front.set_mode(Mode.PASS)
        assert requests.post(f"{front.url}/functions/v1/job-callback", data=body, headers=headers,
                             timeout=5).status_code == 200
        late, prompt = sorted(front.exchanges, key=lambda e: e.arrived)
        assert (late.body, late.status, late.acknowledged(0.5)) == (body, 200, False)
        assert prompt.acknowledged(0.5) and front.late == 1
        assert late.sender_pid == prompt.sender_pid == os.getpid()   # this process sent both
        assert front.terminal_senders(within=60) == {"pod-sdxl-0"}
    finally:
        front.stop()


def test_slow_callbacks_are_answered_within_the_callers_timeout_after_the_delay(supabase_standin):
    front = SupabaseFront(supabase_standin.url)
    body = json.dumps({"job_id": "j-slow", "status": "failed", "worker_id": "pod-wan-0"}).encode()
    headers = {"Authorization": f"Bearer {supabase_standin.service_key}", "apikey": supabase_standin.service_key,
               "Content-Type": "application/json", "X-Callback-Signature": sign(body, supabase_standin.callback_secret)}
    try:
        front.set_mode(Mode.SLOW, delay=0.6)
        assert requests.post(f"{front.url}/functions/v1/job-callback", data=body, headers=headers,
                             timeout=5).status_code == 200
        (exchange,) = front.exchanges
        assert exchange.acknowledged(5.0) and not exchange.acknowledged(0.5)   # it took the delay, no less
        assert [c.raw for c in supabase_standin.callbacks("j-slow")] == [body]
    finally:
        front.stop()

import email.utils
import hashlib
import hmac
import json
import threading
import time

import pytest

from common import keys
from common.errors import ConfigError
from common.settings import Settings
from tests.conftest import SUPABASE_TEST_CALLBACK_SECRET as SECRET
from tests.conftest import SUPABASE_TEST_SERVICE_KEY as KEY
from workers.core import callbacks as cb
from workers.core.callbacks import CallbackClient, OutboxSender, Outcome
from workers.core.transport import RedisProtocolTransport

from .scripted import FakeTime, ScriptedServer


def client(standin, retry_seconds=10.0, secret=SECRET, key=KEY):  # 1+2+4 s of waits (+ jitter) fit
    return CallbackClient(standin.url, key, secret, retry_seconds=retry_seconds, timeout=2,
                          sleep=lambda s: time.sleep(min(s, 0.2)))


def test_body_is_signed_byte_for_byte_and_carries_both_auth_headers(supabase_standin):
    body = cb.encode("job-1", "w1", "completed", [{"type": "image", "url": "u/job-1/0.png"}], None,
                     {"seed": 0, "prompt": "é ünïcode"})
    assert client(supabase_standin).deliver(body) is Outcome.DELIVERED
    received = supabase_standin.wait_for("job-1")
    assert received.raw == body
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert received.headers["x-callback-signature"] == expected
    assert received.headers["authorization"] == f"Bearer {KEY}" and received.headers["apikey"] == KEY
    assert received.headers["content-type"] == "application/json"
    assert set(received.body) == {"job_id", "worker_id", "status", "assets", "error_message", "metadata"}


def test_wrong_secret_is_refused_and_not_retried(supabase_standin):
    body = cb.encode("job-2", "w1", "failed", error_message="x")
    started = time.monotonic()
    assert client(supabase_standin, secret="wrong").deliver(body) is Outcome.REJECTED
    assert time.monotonic() - started < 1.0  # a 401 is final
    assert supabase_standin.callbacks() == []


def test_5xx_and_429_are_retried_until_delivered(supabase_standin):
    supabase_standin.fail_next(2, 503)
    supabase_standin.fail_next(1, 429)
    assert client(supabase_standin).deliver(cb.encode("job-3", "w", "completed")) is Outcome.DELIVERED
    assert len(supabase_standin.callbacks("job-3")) == 1


def test_receiver_down_longer_than_budget_fails(supabase_standin):
    supabase_standin.set_down(True)
    assert client(supabase_standin, retry_seconds=1.0).deliver(cb.encode("job-4", "w", "completed")) is Outcome.FAILED


def test_skipped_counts_as_delivered(supabase_standin):
    supabase_standin.skip_job_ids.add("job-5")
    assert client(supabase_standin).deliver(cb.encode("job-5", "w", "completed")) is Outcome.DELIVERED


def test_progress_is_best_effort_and_does_not_block(supabase_standin):
    supabase_standin.delay = 2.0
    started = time.monotonic()
    client(supabase_standin).progress(cb.encode("job-6", "w", "processing"))
    assert time.monotonic() - started < 0.5
    supabase_standin.wait_for("job-6", status="processing", timeout=10)


def test_outbox_sender_delivers_later_and_empties_the_outbox(supabase_standin, redis_client, redis_server):
    transport = RedisProtocolTransport(redis_server.url, 5)
    body = cb.encode("job-7", "w", "completed")
    redis_client.hset(keys.OUTBOX, "job-7", body)
    supabase_standin.set_down(True)
    sender = OutboxSender(transport, client(supabase_standin))
    assert sender.drain_once() == 0 and sender.pending() == 1
    supabase_standin.set_down(False)
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop, 0.1))
    thread.start()
    try:
        assert supabase_standin.wait_for("job-7", timeout=10).raw == body
        deadline = time.monotonic() + 5
        while sender.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.pending() == 0
    finally:
        stop.set()
        thread.join()


def test_body_never_contains_unserialisable_surprises():
    body = json.loads(cb.encode("j", "w", "failed", None, "boom", {"error_type": "INTERNAL_ERROR"}))
    assert body == {"job_id": "j", "worker_id": "w", "status": "failed", "assets": [], "error_message": "boom",
                    "metadata": {"error_type": "INTERNAL_ERROR"}}


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.stop()


def timed_client(server, fake, retry_seconds=240.0):
    return CallbackClient(server.url, KEY, SECRET, retry_seconds=retry_seconds, timeout=2, sleep=fake.sleep,
                          clock=fake.clock)


def test_backoff_is_exponential_with_jitter_capped_and_within_the_budget(scripted):
    fake = FakeTime()
    scripted.answer(1000, 503)
    assert timed_client(scripted, fake).deliver(cb.encode("j", "w", "completed")) is Outcome.FAILED
    waits = fake.sleeps
    assert len(scripted.requests) == len(waits) + 1
    for n, wait in enumerate(waits[:5]):  # 1, 2, 4, 8, 16 s, each plus up to 1 s of jitter
        assert 2 ** n <= wait <= 2 ** n + 1, waits
    assert any(wait != int(wait) for wait in waits[:5]), waits  # jittered, so senders do not move in step
    assert max(waits) <= 30 and waits[-1] == 30
    assert 240 - 31 < sum(waits) <= 240  # every wait ended inside the budget; one more would not


def test_callback_retry_first_seconds_scales_the_backoff(scripted):
    """CALLBACK_RETRY_FIRST_SECONDS is the first wait (1 s by default); the later ones double from it, each with
    up to as much jitter, still capped at 30 s. The fleet tests shorten it; a wait that is not positive is
    refused."""
    fake = FakeTime()
    scripted.answer(1000, 503)
    settings = Settings.from_env({"SUPABASE_URL": scripted.url, "SUPABASE_SERVICE_KEY": KEY,
                                  "JOB_CALLBACK_SECRET": SECRET, "CALLBACK_RETRY_SECONDS": "60",
                                  "CALLBACK_RETRY_FIRST_SECONDS": "0.25"})
    client = CallbackClient.from_settings(settings)
    client.sleep, client.clock = fake.sleep, fake.clock
    assert client.deliver(cb.encode("j", "w", "completed")) is Outcome.FAILED
    waits = fake.sleeps
    for n, wait in enumerate(waits[:7]):  # 0.25, 0.5, 1 … 16 s, each plus up to 0.25 s of jitter
        assert 0.25 * 2 ** n <= wait <= 0.25 * 2 ** n + 0.25, waits
    assert max(waits) <= 30 and sum(waits) <= 60
    assert Settings.from_env({}).callback_retry_first_seconds == 1.0
    with pytest.raises(ConfigError, match="CALLBACK_RETRY_FIRST_SECONDS"):
        Settings.from_env({"CALLBACK_RETRY_FIRST_SECONDS": "0"})
    with pytest.raises(ValueError, match="retry_first"):
        CallbackClient(scripted.url, KEY, SECRET, retry_first=0)


def test_retry_after_is_honoured(scripted):
    fake = FakeTime()
    scripted.answer(1, 503, Retry_After="7")
    when = email.utils.formatdate(time.time() + 12, usegmt=True)
    scripted.answer(1, 429, Retry_After=when)
    assert timed_client(scripted, fake).deliver(cb.encode("j", "w", "completed")) is Outcome.DELIVERED
    assert len(scripted.requests) == 3
    assert fake.sleeps[0] >= 7 and fake.sleeps[1] >= 9


def test_a_retry_after_past_the_budget_gives_up_at_once(scripted):
    """Waiting past the budget would not deliver anything: the body goes to the outbox now."""
    fake = FakeTime()
    scripted.answer(5, 503, Retry_After="600")
    assert timed_client(scripted, fake, retry_seconds=30).deliver(cb.encode("j", "w", "completed")) is Outcome.FAILED
    assert len(scripted.requests) == 1 and fake.sleeps == []


def test_connection_errors_are_retried_within_the_budget():
    fake = FakeTime()
    from local.net import free_port
    down = CallbackClient(f"http://127.0.0.1:{free_port()}", KEY, SECRET, retry_seconds=20, timeout=1,
                          sleep=fake.sleep, clock=fake.clock)
    assert down.deliver(cb.encode("j", "w", "completed")) is Outcome.FAILED
    assert len(fake.sleeps) >= 3 and sum(fake.sleeps) <= 20

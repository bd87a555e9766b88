"""The callback outbox (review #8, #18): one delivery per entry whatever the number of senders, a dead
sender's lease expires, and 4xx-refused bodies are kept in ``callbacks:rejected`` for a manual replay.

Everything runs against the real redis-server and the loopback Supabase stand-in."""
import json
import logging
import shlex
import threading
import time
from pathlib import Path

import pytest

from common import keys
from tests.conftest import SUPABASE_TEST_CALLBACK_SECRET as SECRET
from tests.conftest import SUPABASE_TEST_SERVICE_KEY as KEY
from tests.procs import WorkerProcess, runtime_env
from workers.core import callbacks as cb
from workers.core.callbacks import CallbackClient, Outbox, OutboxSender
from workers.core.transport import RedisProtocolTransport, UpstashRestTransport

README = Path(__file__).resolve().parents[2] / "README.md"


def client(standin, secret=SECRET):
    return CallbackClient(standin.url, KEY, secret, retry_seconds=1.0, timeout=2,
                          sleep=lambda s: time.sleep(min(s, 0.05)))


def test_three_senders_in_parallel_deliver_each_entry_once(supabase_standin, redis_client, redis_server):
    ids = [f"job-{i}" for i in range(20)]
    for job_id in ids:
        redis_client.hset(keys.OUTBOX, job_id, cb.encode(job_id, "w", "completed"))
    supabase_standin.delay = 0.02  # each POST takes a moment, so the senders overlap
    senders = [OutboxSender(RedisProtocolTransport(redis_server.url, 5), client(supabase_standin))
               for _ in range(3)]
    start = threading.Barrier(len(senders))

    def drain(sender):
        start.wait()
        sender.drain_once()

    threads = [threading.Thread(target=drain, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert supabase_standin.callback_attempts == len(ids)  # POSTs that reached the stand-in
    assert sorted(c.job_id for c in supabase_standin.callbacks()) == sorted(ids)
    assert redis_client.hlen(keys.OUTBOX) == 0
    assert not redis_client.keys(keys.outbox_lease("*"))


def test_an_entry_whose_lease_owner_died_is_delivered_once_the_lease_expires(supabase_standin, redis_client,
                                                                             redis_server):
    body = cb.encode("orphan", "dead-worker", "completed")
    redis_client.hset(keys.OUTBOX, "orphan", body)
    redis_client.set(keys.outbox_lease("orphan"), "dead-worker", px=600)  # its runner died mid-delivery
    sender = OutboxSender(RedisProtocolTransport(redis_server.url, 5), client(supabase_standin), owner="w2")
    assert sender.drain_once() == 0 and supabase_standin.callback_attempts == 0  # a live lease is skipped
    time.sleep(0.7)
    assert sender.drain_once() == 1
    assert supabase_standin.wait_for("orphan", timeout=5).raw == body
    assert redis_client.hlen(keys.OUTBOX) == 0 and not redis_client.exists(keys.outbox_lease("orphan"))


@pytest.fixture(params=["redis", "upstash"])
def transport(request, redis_server):
    """Both transports over the same real redis-server (production uses Upstash REST)."""
    if request.param == "redis":
        yield RedisProtocolTransport(redis_server.url, 5)
    else:
        front = request.getfixturevalue("upstash_front")
        yield UpstashRestTransport(front.url, front.token, 5)


def test_outbox_calls_touch_only_their_own_lease_and_the_same_body(redis_client, transport):
    mine, theirs = Outbox(transport, "w1", 30), Outbox(transport, "w2", 30)
    redis_client.hset(keys.OUTBOX, "j", b"old")
    assert mine.claim("j") and not theirs.claim("j")
    assert 29_000 < redis_client.pttl(keys.outbox_lease("j")) <= 30_000
    theirs.release("j")
    theirs.delivered("j", b"old")  # not its lease: the lease stays; the body matched, so the entry goes
    assert redis_client.get(keys.outbox_lease("j")) == b"w1" and not redis_client.hexists(keys.OUTBOX, "j")
    redis_client.hset(keys.OUTBOX, "j", b"new")  # a newer body is owed: delivering the old one keeps it
    mine.delivered("j", b"old")
    assert redis_client.hget(keys.OUTBOX, "j") == b"new" and not redis_client.exists(keys.outbox_lease("j"))
    assert mine.take("gone") is None and not redis_client.exists(keys.outbox_lease("gone"))  # no entry, no lease
    assert mine.take("j") == b"new" and theirs.take("j") is None
    mine.release("j")
    assert not redis_client.exists(keys.outbox_lease("j")) and redis_client.hget(keys.OUTBOX, "j") == b"new"


def test_a_rejected_body_is_kept_for_replay_and_leaves_the_outbox(redis_client, transport):
    outbox = Outbox(transport, "w1", 30)
    redis_client.hset(keys.OUTBOX, "j", b"body")
    assert outbox.claim("j")
    outbox.rejected("j", b"body")
    assert redis_client.hget(keys.REJECTED, "j") == b"body"
    assert not redis_client.hexists(keys.OUTBOX, "j") and not redis_client.exists(keys.outbox_lease("j"))


def test_a_refused_callback_is_kept_for_replay_and_logged_once(supabase_standin, redis_client, redis_server,
                                                               caplog):
    """Review #18: a rotated or mistyped JOB_CALLBACK_SECRET gets a 401 on every callback; per the contract
    that is final, but the body must not be lost: it moves to callbacks:rejected, logged once with the status."""
    body = cb.encode("refused", "w", "completed")
    redis_client.hset(keys.OUTBOX, "refused", body)
    sender = OutboxSender(RedisProtocolTransport(redis_server.url, 5), client(supabase_standin, secret="rotated"))
    with caplog.at_level(logging.ERROR, logger="workers.core.callbacks"):
        assert sender.drain_once() == 1
        assert sender.drain_once() == 0
    assert redis_client.hget(keys.REJECTED, "refused") == body
    assert redis_client.hlen(keys.OUTBOX) == 0 and supabase_standin.callback_attempts == 1
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "HTTP 401" in refusals[0].getMessage()
    assert "rotated" not in caplog.text and KEY not in caplog.text


def test_the_documented_replay_puts_a_rejected_body_back_and_it_is_delivered(supabase_standin, redis_client,
                                                                             redis_server):
    """README "Replaying refused callbacks": the EVAL one-liner moves the body back to the outbox, where a
    sender (now with the right secret) delivers it, re-signed."""
    line = next(x for x in README.read_text().splitlines() if x.startswith("EVAL ") and "callbacks:rejected" in x)
    command = shlex.split(line.split("  #")[0].replace("<job_id>", "refused"))
    body = cb.encode("refused", "w", "completed")
    redis_client.hset(keys.REJECTED, "refused", body)
    assert redis_client.execute_command(*command) == 1
    assert redis_client.hget(keys.OUTBOX, "refused") == body and not redis_client.hexists(keys.REJECTED, "refused")
    assert redis_client.execute_command(*command) == 0  # nothing left to replay
    sender = OutboxSender(RedisProtocolTransport(redis_server.url, 5), client(supabase_standin))
    assert sender.drain_once() == 1
    assert supabase_standin.wait_for("refused", timeout=5).raw == body


def test_three_worker_processes_sharing_the_outbox_deliver_each_entry_once(redis_server, redis_client,
                                                                           supabase_standin, tmp_path):
    """Review #8 at process level: three real workers (gunicorn, ``python -m workers``), each with its own
    outbox thread on the one hash, every 0.2 s; 20 owed callbacks reach the app once each."""
    ids = [f"owed-{i}" for i in range(20)]
    for job_id in ids:
        redis_client.hset(keys.OUTBOX, job_id, cb.encode(job_id, "gone-worker", "completed"))
    supabase_standin.delay = 0.05
    env = runtime_env(redis_server.url, supabase_standin, tmp_path / "storage", OUTBOX_INTERVAL_SECONDS="0.2")
    workers = [WorkerProcess(env, slot=slot, log_path=tmp_path / f"worker{slot}.log") for slot in range(3)]
    try:
        for worker in workers:
            worker.wait_healthy()
        deadline = time.monotonic() + 30
        while redis_client.hlen(keys.OUTBOX) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a few more rounds of all three senders
        assert redis_client.hlen(keys.OUTBOX) == 0
        assert supabase_standin.callback_attempts == len(ids)
        assert sorted(c.job_id for c in supabase_standin.callbacks()) == sorted(ids)
    finally:
        for worker in workers:
            worker.close()


def test_a_worker_whose_callbacks_are_refused_keeps_every_terminal_body(redis_server, redis_client,
                                                                        supabase_standin, tmp_path):
    """Review #18 at process level: a worker with a secret the app does not accept (401 on every callback)
    still acknowledges its job (a 4xx is final), and the terminal body waits in callbacks:rejected."""
    env = runtime_env(redis_server.url, supabase_standin, tmp_path / "storage", JOB_CALLBACK_SECRET="rotated")
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log")
    job = {"id": "refused-job", "type": "sdxl_image_fast", "prompt": "p", "user_id": "user-1", "config": {}}
    try:
        worker.wait_healthy()
        redis_client.rpush("sdxl_queue", json.dumps([json.dumps(job)]))
        deadline = time.monotonic() + 30
        while not redis_client.hexists(keys.REJECTED, "refused-job") and time.monotonic() < deadline:
            time.sleep(0.1)
        kept = json.loads(redis_client.hget(keys.REJECTED, "refused-job") or b"null")
        assert kept is not None and kept["job_id"] == "refused-job" and kept["status"] == "completed", kept
        assert redis_client.llen("sdxl_queue") == 0 and redis_client.hlen(keys.OUTBOX) == 0
        assert not [k for k in redis_client.keys("sdxl_queue:processing:*") if redis_client.llen(k)]
        assert supabase_standin.callbacks() == []  # nothing was accepted
        log = (tmp_path / "worker.log").read_text()
        assert log.count("refused a callback with HTTP 401") == 1 and "rotated" not in log
    finally:
        worker.close()

import json

import pytest

from workers.core import keys
from workers.core.queue import ReliableQueue
from workers.core.transport import TransportError, UpstashRestTransport

Q = "sdxl_queue"


def make(transport, worker="w1", **kw):
    return ReliableQueue(transport, Q, worker, heartbeat_ttl=kw.pop("ttl", 30), poll_min=0.01, poll_max=0.05,
                         sleep=lambda s: None, **kw)


def job(n):
    return json.dumps({"id": f"job-{n}", "type": "sdxl_image_fast", "user_id": "u"}).encode()


def test_fifo_for_rpush_producers(transport, redis_client):
    for n in range(5):
        redis_client.rpush(Q, job(n))
    q = make(transport)
    taken = [q.fetch(0.1).raw for _ in range(5)]
    assert taken == [job(n) for n in range(5)]
    assert q.fetch(0.05) is None


def test_right_side_for_lpush_producers(transport, redis_client):
    for n in range(3):
        redis_client.lpush(Q, job(n))
    q = make(transport, side="right")
    assert [q.fetch(0.1).raw for _ in range(3)] == [job(n) for n in range(3)]


def test_fetched_job_sits_in_processing_until_finished(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    delivery = q.fetch(0.1)
    assert redis_client.llen(Q) == 0  # ops' LLEN shows waiting jobs only
    assert redis_client.lrange(keys.processing(Q, "w1"), 0, -1) == [job(1)]
    assert q.count_attempt("job-1") == 1
    q.finish(delivery, "job-1")
    assert redis_client.llen(keys.processing(Q, "w1")) == 0
    assert redis_client.hget(keys.attempts(Q), "job-1") is None
    assert q.already_done("job-1")
    assert 0 < redis_client.ttl(keys.done("job-1")) <= keys.DONE_TTL_SECONDS


def test_finish_to_outbox_is_one_step(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    q.finish_to_outbox(q.fetch(0.1), "job-1", b'{"job_id":"job-1"}')
    assert redis_client.llen(keys.processing(Q, "w1")) == 0
    assert redis_client.hget(keys.OUTBOX, "job-1") == b'{"job_id":"job-1"}'


def test_hand_back_goes_to_the_head_and_does_not_count(transport, redis_client):
    redis_client.rpush(Q, job(1), job(2))
    q = make(transport)
    delivery = q.fetch(0.1)
    q.count_attempt("job-1")
    q.hand_back(delivery, "job-1")
    assert redis_client.lrange(Q, 0, -1) == [job(1), job(2)]
    assert int(redis_client.hget(keys.attempts(Q), "job-1")) == 0


def test_dead_letter_keeps_the_raw_element_and_the_reason(transport, redis_client):
    redis_client.rpush(Q, b"garbage")
    q = make(transport)
    q.dead_letter(q.fetch(0.1), "undecodable", None)
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [b"garbage"]
    assert json.loads(redis_client.lindex(keys.dead_log(Q), 0))["reason"] == "undecodable"
    assert redis_client.llen(keys.processing(Q, "w1")) == 0


def test_reaper_returns_a_dead_workers_jobs_to_the_head_in_order(transport, redis_client):
    redis_client.rpush(Q, job(1), job(2), job(3))
    dead = make(transport, "dead-worker", ttl=30)
    dead.heartbeat()
    dead.fetch(0.1), dead.fetch(0.1)  # holds job 1 and 2 (an abnormal state, to check the order)
    now = [100.0]
    alive = make(transport, "alive", clock=lambda: now[0])
    alive.heartbeat()
    assert alive.reap() == 0  # heartbeat still there
    redis_client.delete(keys.heartbeat("dead-worker"))
    assert alive.reap() == 0  # missing for less than a TTL: could be a Redis restart, give it time to beat
    now[0] += 29
    assert alive.reap() == 0
    now[0] += 1
    assert alive.reap() == 2
    assert redis_client.lrange(Q, 0, -1) == [job(1), job(2), job(3)]
    assert b"sdxl_queue|dead-worker" not in redis_client.smembers(keys.ACTIVE_WORKERS)


def test_a_heartbeat_that_comes_back_within_the_grace_is_not_reaped(transport, redis_client):
    redis_client.rpush(Q, job(1))
    busy = make(transport, "busy", ttl=30)
    busy.heartbeat()
    busy.fetch(0.1)
    now = [0.0]
    reaper = make(transport, "reaper", clock=lambda: now[0])
    redis_client.delete(keys.heartbeat("busy"))  # e.g. Redis restarted without the TTL'd key
    assert reaper.reap() == 0
    busy.heartbeat()
    now[0] += 31
    assert reaper.reap() == 0
    redis_client.delete(keys.heartbeat("busy"))
    now[0] += 1
    assert reaper.reap() == 0  # the grace starts again from this sighting
    assert redis_client.llen(keys.processing(Q, "busy")) == 1


def test_recover_own_after_a_restart(transport, redis_client):
    redis_client.rpush(Q, job(1))
    make(transport).fetch(0.1)
    assert make(transport).recover_own() == 1
    assert redis_client.lrange(Q, 0, -1) == [job(1)]


def test_heartbeat_has_a_ttl_and_retire_cleans_up(transport, redis_client):
    q = make(transport, ttl=7)
    q.heartbeat()
    assert 0 < redis_client.ttl(keys.heartbeat("w1")) <= 7
    q.retire()
    assert not redis_client.exists(keys.heartbeat("w1"))
    assert not redis_client.smembers(keys.ACTIVE_WORKERS)


def test_rest_transport_polls_with_backoff(redis_client, upstash_front):
    sleeps = []
    t = UpstashRestTransport(upstash_front.url, upstash_front.token, timeout=5)
    q = ReliableQueue(t, Q, "w1", poll_min=0.1, poll_max=0.8, sleep=sleeps.append)
    for _ in range(6):
        assert q.fetch() is None
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    redis_client.rpush(Q, job(1))
    assert q.fetch().raw == job(1)
    q.fetch()
    assert sleeps[-1] == 0.1  # backoff resets after work


def test_unreachable_redis_raises_transport_error():
    from workers.core.transport import RedisProtocolTransport
    from workers.local.net import free_port
    t = RedisProtocolTransport(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(TransportError):
        make(t).fetch(0.1)

import json

import pytest

from common import keys
from workers.core.queue import Claim, ReliableQueue, Settled, Skipped
from workers.core.transport import TransportError, UpstashRestTransport

Q = "sdxl_queue"


def make(transport, worker="w1", **kw):
    return ReliableQueue(transport=transport, queue=Q, worker_id=worker, heartbeat_ttl=kw.pop("ttl", 30),
                         poll_min=0.01, poll_max=0.05, sleep=lambda s: None, **kw)


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


def test_fetched_job_sits_in_processing_until_settled(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    delivery = q.fetch(0.1)
    assert redis_client.llen(Q) == 0  # ops' LLEN shows waiting jobs only
    assert redis_client.lrange(keys.processing(Q, "w1"), 0, -1) == [job(1)]
    claim = q.begin(delivery, "job-1")
    assert claim == Claim("job-1", 1, "w1:1")
    assert redis_client.get(keys.claim("job-1")) == b"w1:1" and 0 < redis_client.ttl(keys.claim("job-1")) <= 90
    assert q.settle(delivery, "job-1", b'{"job_id":"job-1"}', claim.token, 30.4) is Settled.SETTLED
    assert redis_client.llen(keys.processing(Q, "w1")) == 0
    assert redis_client.hget(keys.attempts(Q), "job-1") is None
    assert not redis_client.exists(keys.claim("job-1"))
    assert 0 < redis_client.ttl(keys.done("job-1")) <= keys.DONE_TTL_SECONDS
    assert redis_client.hget(keys.OUTBOX, "job-1") == b'{"job_id":"job-1"}'
    assert redis_client.get(keys.outbox_lease("job-1")) == b"w1"
    assert 30 < redis_client.ttl(keys.outbox_lease("job-1")) <= 31   # the lease's seconds, rounded up


def test_settle_can_dead_letter_in_the_same_step(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    delivery = q.fetch(0.1)
    claim = q.begin(delivery, "job-1")
    q.settle(delivery, "job-1", b"failed", claim.token, 10, dead_reason="INTERNAL_ERROR on the last attempt")
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [job(1)]
    assert json.loads(redis_client.lindex(keys.dead_log(Q), 0))["reason"] == "INTERNAL_ERROR on the last attempt"
    assert redis_client.hget(keys.OUTBOX, "job-1") == b"failed" and redis_client.exists(keys.done("job-1"))


def test_a_settle_retried_after_its_reply_was_lost_is_still_settled(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    delivery = q.fetch(0.1)
    claim = q.begin(delivery, "job-1")
    assert q.settle(delivery, "job-1", b"body", claim.token, 10) is Settled.SETTLED
    assert q.settle(delivery, "job-1", b"body", claim.token, 10) is Settled.SETTLED   # the retry
    assert redis_client.hget(keys.OUTBOX, "job-1") == b"body" and redis_client.llen(Q) == 0


def test_settle_writes_nothing_once_the_claim_is_not_ours(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    delivery = q.fetch(0.1)
    claim = q.begin(delivery, "job-1")
    redis_client.set(keys.claim("job-1"), "w2:2")   # taken over by another worker after ours lapsed
    assert q.settle(delivery, "job-1", b"body", claim.token, 10) is Settled.FENCED
    assert redis_client.hlen(keys.OUTBOX) == 0 and not redis_client.exists(keys.done("job-1"))
    assert redis_client.get(keys.claim("job-1")) == b"w2:2"
    assert redis_client.lrange(Q, 0, -1) == [job(1)]   # our copy is not stranded: back to the head


def test_begin_drops_a_finished_jobs_copy_and_sends_a_claimed_one_to_the_tail(transport, redis_client):
    redis_client.rpush(Q, job(1), job(2), job(3))
    redis_client.set(keys.done("job-1"), 1)
    redis_client.set(keys.claim("job-2"), "other-worker:1")
    q = make(transport)
    assert q.begin(q.fetch(0.1), "job-1") is Skipped.DONE
    assert q.begin(q.fetch(0.1), "job-2") is Skipped.BUSY
    assert redis_client.lrange(Q, 0, -1) == [job(3), job(2)]
    assert redis_client.llen(keys.processing(Q, "w1")) == 0 and redis_client.hlen(keys.attempts(Q)) == 0
    redis_client.set(keys.claim("job-3"), "w1:4")   # our own (a begin whose reply was lost): not a reason to wait
    assert q.begin(q.fetch(0.1), "job-3") == Claim("job-3", 1, "w1:1")


def test_begin_does_not_count_an_element_that_already_left(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport)
    delivery = q.fetch(0.1)
    assert q.hand_back(delivery, "job-1") is True   # a cold stop got there first
    assert q.begin(delivery, "job-1") is Skipped.GONE
    assert redis_client.hlen(keys.attempts(Q)) == 0 and not redis_client.exists(keys.claim("job-1"))


def test_hand_back_goes_to_the_head_and_undoes_only_an_attempt_it_counted(transport, redis_client):
    redis_client.rpush(Q, job(1), job(2))
    q = make(transport)
    delivery = q.fetch(0.1)
    claim = q.begin(delivery, "job-1")
    assert q.hand_back(delivery, "job-1", claim.token) is True
    assert redis_client.lrange(Q, 0, -1) == [job(1), job(2)]
    assert int(redis_client.hget(keys.attempts(Q), "job-1")) == 0 and not redis_client.exists(keys.claim("job-1"))
    delivery = q.fetch(0.1)
    assert q.hand_back(delivery, "job-1", None) is True   # never counted: nothing to undo
    assert int(redis_client.hget(keys.attempts(Q), "job-1")) == 0
    delivery = q.fetch(0.1)
    claim = q.begin(delivery, "job-1")
    assert q.hand_back(delivery, "job-1", claim.token, count_attempt=True) is True
    assert int(redis_client.hget(keys.attempts(Q), "job-1")) == 1
    assert q.hand_back(delivery, "job-1", claim.token) is False   # gone already: nothing undone
    assert int(redis_client.hget(keys.attempts(Q), "job-1")) == 1


def test_a_claim_is_renewed_only_by_its_holder(transport, redis_client):
    redis_client.rpush(Q, job(1))
    q = make(transport, ttl=10)
    claim = q.begin(q.fetch(0.1), "job-1")
    redis_client.expire(keys.claim("job-1"), 5)
    assert q.holds_claim("job-1", claim.token) and q.renew_claim("job-1", claim.token)
    assert 25 < redis_client.ttl(keys.claim("job-1")) <= 30
    assert not q.renew_claim("job-1", "w1:7") and not q.holds_claim("job-1", "w1:7")


def test_dead_letter_keeps_the_raw_element_and_the_reason(transport, redis_client):
    redis_client.rpush(Q, b"garbage", b"\xff\xfe not UTF-8")
    q = make(transport)
    q.dead_letter(q.fetch(0.1), "undecodable")
    delivery = q.fetch(0.1)
    assert delivery.raw == b"\xff\xfe not UTF-8"   # the exact bytes, over REST too
    q.dead_letter(delivery, "not UTF-8")
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [b"garbage", b"\xff\xfe not UTF-8"]
    assert json.loads(redis_client.lindex(keys.dead_log(Q), 1))["reason"] == "undecodable"
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


def test_the_reaper_finds_a_processing_list_outside_the_registry(transport, redis_client):
    """A move that landed after its worker retired (review #2): no heartbeat, no workers:active member."""
    redis_client.rpush(keys.processing(Q, "retired"), job(1))
    redis_client.rpush(keys.processing(Q, "alive-elsewhere"), job(2))
    redis_client.set(keys.heartbeat("alive-elsewhere"), 1)
    now = [0.0]
    reaper = make(transport, "reaper", ttl=30, clock=lambda: now[0])
    assert reaper.reap() == 0   # first sighting: the grace starts
    now[0] += 30
    assert reaper.reap() == 1
    assert redis_client.lrange(Q, 0, -1) == [job(1)]
    assert redis_client.lrange(keys.processing(Q, "alive-elsewhere"), 0, -1) == [job(2)]


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


def test_a_failed_move_is_followed_by_a_recovery_before_the_next_one(transport, redis_client):
    class LostReply:   # the move runs on the server; its reply never arrives
        def __init__(self, inner):
            self.inner, self.can_block, self.lose = inner, inner.can_block, True

        def blocking_move(self, *args):
            moved = self.inner.blocking_move(*args)
            if self.lose:
                raise TransportError("redis: TimeoutError: Timeout reading from socket")
            return moved

        def command(self, *args):
            reply = self.inner.command(*args)
            if self.lose and args[0] == "LMOVE":
                raise TransportError("upstash: ReadTimeout")
            return reply
    redis_client.rpush(Q, job(1), job(2))
    lossy = LostReply(transport)
    q = make(lossy)
    with pytest.raises(TransportError):
        q.fetch(0.1)
    assert redis_client.lrange(keys.processing(Q, "w1"), 0, -1) == [job(1)]
    lossy.lose = False
    assert q.fetch(0.1).raw == job(1)   # returned to the head first, then taken again
    assert redis_client.lrange(Q, 0, -1) == [job(2)]


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
    q = ReliableQueue(transport=t, queue=Q, worker_id="w1", poll_min=0.1, poll_max=0.8, sleep=sleeps.append)
    for _ in range(6):
        assert q.fetch() is None
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    redis_client.rpush(Q, job(1))
    assert q.fetch().raw == job(1)
    q.fetch()
    assert sleeps[-1] == 0.1  # backoff resets after work


def test_unreachable_redis_raises_transport_error():
    from local.net import free_port
    from workers.core.transport import RedisProtocolTransport
    t = RedisProtocolTransport(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(TransportError):
        make(t).fetch(0.1)

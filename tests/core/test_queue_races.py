"""Races around the queue that the one-fault-at-a-time tests missed (review #2, #3, #9, #10), on the real
redis-server (a delaying TCP proxy on loopback where a reply must come late), real worker processes where the
fault is process-level, and the loopback Supabase stand-in."""
import socket
import threading
import time

from common import keys
from tests.core.rig import Hold, Q, Scripted, element, held, process_on_a_thread, wait_until
from tests.procs import WorkerProcess, runtime_env
from workers.core.transport import RedisProtocolTransport


# -- #2: a move in flight while the worker retires ----------------------------------------------------------
def test_a_job_moved_by_a_blmove_in_flight_during_retire_is_returned_by_the_reaper(rig, redis_client):
    dying = rig.queue("dying", ttl=1)
    dying.heartbeat()
    moved = []
    in_flight = threading.Thread(target=lambda: moved.append(dying.fetch(wait=1.0)))
    in_flight.start()
    time.sleep(0.2)           # the BLMOVE is blocked on the empty queue
    dying.retire()            # the pod drain: nothing held, so the worker leaves the registry
    redis_client.rpush(Q, element("j"))
    in_flight.join(5)
    assert moved[0] is not None and held(redis_client, "dying") == [element("j")]
    now = [0.0]
    reaper = rig.queue("alive", ttl=1, clock=lambda: now[0])
    reaper.heartbeat()
    returned = 0
    for _ in range(20):       # ten TTLs of reaping
        returned += reaper.reap()
        now[0] += 0.5
    assert returned == 1
    assert redis_client.lrange(Q, 0, -1) == [element("j")] and held(redis_client, "dying") == []


def test_retire_keeps_the_registry_entry_of_a_worker_that_still_holds_a_job(rig, redis_client):
    q = rig.queue("w1")
    q.heartbeat()
    redis_client.rpush(Q, element("j"))
    q.fetch(0.1)
    q.retire()
    assert not redis_client.exists(keys.heartbeat("w1"))
    assert redis_client.smembers(keys.ACTIVE_WORKERS) == {keys.active_member(Q, "w1").encode()}


# -- #3: a late BLMOVE reply -------------------------------------------------------------------------------
class DelayingProxy:
    """A TCP proxy on 127.0.0.1 in front of redis-server; while ``delay`` > 0 it holds every chunk the server
    sends for that long (a BGSAVE fork, a network stall, a failover pause)."""

    def __init__(self, port: int):
        self.target = port
        self.delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source, sink, late):
        try:
            while data := source.recv(65536):
                if late and self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_a_blmove_whose_reply_comes_late_does_not_strand_the_job(rig, redis_server, redis_client,
                                                                 supabase_standin):
    proxy = DelayingProxy(redis_server.port)
    try:
        queue = rig.queue("w1", RedisProtocolTransport(proxy.url, timeout=0.5))
        runner = rig.runner("w1", queue=queue)
        queue.heartbeat()          # the connection is up before replies turn late
        stop = rig.loop(runner)
        time.sleep(0.2)
        proxy.delay = 1.0          # longer than the socket timeout
        redis_client.rpush(Q, element("a"))
        wait_until(lambda: held(redis_client, "w1"), 5, "the server-side move")
        time.sleep(0.6)            # the worker's read has timed out by now
        proxy.delay = 0.0
        redis_client.rpush(Q, element("b"))
        supabase_standin.wait_for("b", timeout=15)
        supabase_standin.wait_for("a", timeout=15)
        stop.set()
        wait_until(lambda: not held(redis_client, "w1"), 5, "the processing list to empty")
        assert redis_client.llen(Q) == 0
    finally:
        proxy.close()


# -- #9: one claim per running job, fencing by attempt ------------------------------------------------------
def test_a_second_copy_of_a_running_job_waits_at_the_tail_and_is_dropped_once_done(rig, redis_client,
                                                                                  supabase_standin):
    hold = Hold("w1")
    w1 = rig.runner("w1", Scripted("w1", hold))
    redis_client.rpush(Q, element("j"), element("j"), element("other"))   # the producer's RPUSH was retried
    first = process_on_a_thread(w1)
    hold.started.wait(5)
    commands = []

    class Counting:
        can_block = True

        def __init__(self, inner):
            self.inner = inner

        def blocking_move(self, *args):
            commands.append("move")
            return self.inner.blocking_move(*args)

        def command(self, *args):
            return self.inner.command(*args)

        def close(self):
            self.inner.close()
    w2_handler = Scripted("w2")
    w2 = rig.runner("w2", w2_handler, queue=rig.queue("w2", Counting(rig.transport()), poll_max=0.2))
    stop = rig.loop(w2)
    supabase_standin.wait_for("other", timeout=10)
    wait_until(lambda: redis_client.lrange(Q, 0, -1) == [element("j")], 5, "the copy at the tail")
    moves = len(commands)
    time.sleep(0.5)
    assert len(commands) - moves <= 10   # it pauses about poll_max between looks at the copy: no spinning
    assert w2_handler.runs == ["other"]  # the copy never started while w1's claim lived
    hold.released.set()
    first.join(10)
    wait_until(lambda: redis_client.llen(Q) == 0 and not held(redis_client, "w2"), 10, "the copy to be dropped")
    stop.set()
    assert [c.body["worker_id"] for c in supabase_standin.callbacks("j", "completed")] == ["w1"]
    assert len(supabase_standin.callbacks("j", "processing")) == 1


def test_a_worker_whose_claim_was_taken_over_neither_uploads_nor_sends_a_terminal_callback(rig, redis_client,
                                                                                         supabase_standin):
    """#9(b): a worker cut off from Redis for longer than the claim's TTL while its GPU job goes on; another
    pod reaps and reruns the job. When the first worker comes back, its result is discarded."""
    rig.ttl = 1
    hold = Hold("w1")
    w1 = rig.runner("w1", Scripted("w1", hold))
    w1.queue.heartbeat()
    redis_client.rpush(Q, element("j"))
    first = process_on_a_thread(w1)
    hold.started.wait(5)
    redis_client.delete(keys.heartbeat("w1"))         # w1 can no longer beat (nor renew its claim)
    now = [0.0]
    w2_queue = rig.queue("w2", clock=lambda: now[0])
    w2_queue.heartbeat()
    assert w2_queue.reap() == 0
    now[0] += 1
    assert w2_queue.reap() == 1
    wait_until(lambda: not redis_client.exists(keys.claim("j")), 5, "w1's claim to lapse")
    w2 = rig.runner("w2", queue=w2_queue)
    w2.process(w2_queue.fetch(0.1))
    assert supabase_standin.wait_for("j", timeout=5).body["worker_id"] == "w2"
    hold.released.set()                                     # w1 comes back with its result
    first.join(10)
    time.sleep(0.3)
    assert [c.body["worker_id"] for c in supabase_standin.callbacks("j", "completed")] == ["w2"]
    assert rig.stored("j") == b"made by w2" and rig.stored("j", "0.thumb.webp") == b"thumb w2"
    assert redis_client.llen(Q) == 0 and held(redis_client, "w1") == [] and redis_client.hlen(keys.OUTBOX) == 0


def test_a_job_reaped_while_it_ran_is_settled_once_by_its_live_claim_holder(rig, redis_client, supabase_standin):
    """A worker stalled past the reaper's grace but not past its claim: its copy goes back to the queue, the
    worker finishes, and the returned copy is dropped as done. The settle that removed nothing is counted."""
    hold = Hold("w1")
    w1 = rig.runner("w1", Scripted("w1", hold))
    w1.queue.heartbeat()
    redis_client.rpush(Q, element("j"))
    first = process_on_a_thread(w1)
    hold.started.wait(5)
    redis_client.delete(keys.heartbeat("w1"))
    now = [0.0]
    w2_queue = rig.queue("w2", clock=lambda: now[0])
    w2_queue.reap()
    now[0] += rig.ttl
    assert w2_queue.reap() == 1 and redis_client.lrange(Q, 0, -1) == [element("j")]
    hold.released.set()
    first.join(10)
    assert supabase_standin.wait_for("j", timeout=5).body["worker_id"] == "w1"
    assert w1.metrics.jobs.labels("sdxl_image_fast", "reaped_while_running")._value.get() == 1
    w2 = rig.runner("w2", queue=w2_queue)
    w2.process(w2_queue.fetch(0.1))                   # the returned copy: done, so dropped
    assert w2.handler.runs == [] and redis_client.llen(Q) == 0 and held(redis_client, "w2") == []
    assert len(supabase_standin.callbacks("j", "completed")) == 1


def test_the_same_job_pushed_twice_to_two_worker_processes_runs_once(procs, redis_server, redis_client,
                                                                     supabase_standin, tmp_path):
    env = runtime_env(redis_server.url, supabase_standin, tmp_path / "storage")
    for slot in (1, 2):
        procs.append(WorkerProcess(env, slot=slot, log_path=tmp_path / f"worker{slot}.log").wait_healthy())
    twice = element("twice", sleep=2)
    redis_client.rpush(Q, twice, twice)
    done = supabase_standin.wait_for("twice", timeout=30)
    wait_until(lambda: redis_client.llen(Q) == 0 and not redis_client.keys(f"{Q}:processing:*"), 15,
               "the second copy to be dropped")
    assert len(supabase_standin.callbacks("twice", "completed")) == 1
    assert len(supabase_standin.callbacks("twice", "processing")) == 1
    assert done.body["assets"][0]["url"] == "user-1/twice/0.png" and redis_client.llen(keys.dead(Q)) == 0


# -- #10: a non-UTF-8 element over Upstash REST -------------------------------------------------------------
def test_a_non_utf8_element_over_upstash_rest_is_dead_lettered_and_the_queue_moves_on(
        procs, redis_server, redis_client, upstash_front, supabase_standin, tmp_path):
    env = runtime_env(None, supabase_standin, tmp_path / "storage", UPSTASH_REDIS_REST_URL=upstash_front.url,
                      UPSTASH_REDIS_REST_TOKEN=upstash_front.token)
    procs.append(WorkerProcess(env, log_path=tmp_path / "worker.log").wait_healthy())
    bad = b"\xff\xfe not text \x80"
    redis_client.rpush(Q, bad, element("good"))
    supabase_standin.wait_for("good", timeout=30)
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [bad]
    assert b"not UTF-8" in redis_client.lindex(keys.dead_log(Q), 0)
    wait_until(lambda: not redis_client.keys(f"{Q}:processing:*") and redis_client.llen(Q) == 0, 10,
               "the queue to drain")


def test_a_claim_taken_or_renewed_within_half_its_ttl_is_known_without_asking(rig, redis_client):
    """The check before upload costs no round trip while the claim cannot have expired (a live claim is never
    taken over); past half its TTL, or once this worker handed the job back, Redis is asked again. The claim
    key is overwritten by hand below only to show which answers come from Redis."""
    now = [0.0]
    queue = rig.queue("w1", clock=lambda: now[0])
    redis_client.rpush(Q, element("j"))
    delivery = queue.fetch(0.1)
    claim = queue.begin(delivery, "j")
    redis_client.set(keys.claim("j"), "w9:7")
    assert queue.holds_claim("j", claim.token) is True          # known: taken just now
    now[0] += queue.claim_ttl / 2
    assert queue.holds_claim("j", claim.token) is False         # asked: Redis says w9
    redis_client.set(keys.claim("j"), claim.token)
    assert queue.renew_claim("j", claim.token) is True
    redis_client.set(keys.claim("j"), "w9:7")
    assert queue.holds_claim("j", claim.token) is True          # known again: renewed just now
    assert queue.hand_back(delivery, "j", claim.token) is True
    assert queue.holds_claim("j", claim.token) is False         # handed back: asked

"""The runner's terminal step (review #1, #7's root, #18's runner half), its circuit breaker (#5) and its
per-job deadline (#4), on the real redis-server, the loopback Supabase stand-in and local storage.

The promise under test: before a job's element leaves the processing list, its terminal callback is durable in
the outbox (under this worker's lease); the runner then delivers it itself and clears the entry. No path marks
a job done while its callback lives only in memory.
"""
import json
import signal
import threading
import time

import pytest

from common import keys
from common.exit_codes import ExitCode
from tests.conftest import SUPABASE_TEST_CALLBACK_SECRET, SUPABASE_TEST_SERVICE_KEY
from tests.core.rig import Hold, Q, Scripted, element, held, made_by, process_on_a_thread, wait_until
from tests.procs import WorkerProcess, runtime_env
from workers.core.callbacks import CallbackClient, OutboxSender
from workers.core.errors import ErrorType, FatalWorkerError, InvalidJob, RetryableError, WorkerError
from workers.core.job import JobType
from workers.core.runner import JobTimeouts
from workers.core.transport import RedisProtocolTransport


def raises(exc):
    def behaviour(job, progress):
        raise exc
    return behaviour


# -- #1: every terminal path is durable before the element leaves -------------------------------------------
PATHS = {
    # name: (element, handler behaviour, attempts already spent, expected status, expected error type)
    "completed": (element("j"), None, 0, "completed", None),
    "invalid job (id known)": (json.dumps({"id": "j", "type": "sdxl_image_fast", "user_id": "u",
                                           "config": "nope"}).encode(), None, 0, "failed", "INVALID_JOB"),
    "non-retryable failure": (element("j"), raises(WorkerError("bad prompt", ErrorType.INVALID_PROMPT)), 0,
                              "failed", "INVALID_PROMPT"),
    "dead on the last attempt": (element("j"), raises(RetryableError("flaky", ErrorType.STORAGE_ERROR)), 2,
                                 "failed", "STORAGE_ERROR"),
    "attempt limit exceeded": (element("j"), None, 3, "failed", "INTERNAL_ERROR"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_terminal_path_is_durable_in_the_outbox_while_its_callback_is_in_flight(path, rig, redis_client,
                                                                                      supabase_standin):
    raw, behaviour, spent, status, error_type = PATHS[path]
    if spent:
        redis_client.hset(keys.attempts(Q), "j", spent)
    seen = {}

    def at_delivery(callback):  # runs inside the stand-in while the runner waits for the answer
        if callback.status in ("completed", "failed"):
            seen.update(processing=held(redis_client, "w1"), outbox=redis_client.hget(keys.OUTBOX, "j"),
                        lease=redis_client.get(keys.outbox_lease("j")), done=redis_client.exists(keys.done("j")))
    supabase_standin.on_callback = at_delivery
    redis_client.rpush(Q, raw)
    runner = rig.runner("w1", Scripted("w1", behaviour))
    runner.process(runner.queue.fetch(0.1))
    terminal = supabase_standin.wait_for("j", status=status, timeout=5)
    assert terminal.body["metadata"].get("error_type") == error_type
    assert seen == {"processing": [], "outbox": terminal.raw, "lease": b"w1", "done": 1}
    assert redis_client.hlen(keys.OUTBOX) == 0 and not redis_client.exists(keys.outbox_lease("j"))
    assert redis_client.llen(Q) == 0 and not redis_client.exists(keys.claim("j"))
    assert redis_client.hget(keys.attempts(Q), "j") is None
    assert redis_client.llen(keys.dead(Q)) == (1 if path.startswith(("dead", "attempt")) else 0)


def test_a_cold_stop_while_the_terminal_callback_is_in_flight_hands_nothing_back(rig, redis_client,
                                                                               supabase_standin):
    """#7's root: once the terminal step ran, the element is gone; a hand-back finds nothing to return."""
    runner = rig.runner("w1")
    answers = []
    supabase_standin.on_callback = lambda cb: cb.status == "completed" and answers.append(runner.hand_back_current())
    redis_client.rpush(Q, element("j"))
    runner.process(runner.queue.fetch(0.1))
    assert answers == [False]
    assert redis_client.llen(Q) == 0 and len(supabase_standin.callbacks("j", "completed")) == 1
    assert redis_client.hlen(keys.OUTBOX) == 0


def test_an_undeliverable_callback_stays_in_the_outbox_with_the_lease_released(rig, redis_client,
                                                                               supabase_standin):
    supabase_standin.set_down(True)
    redis_client.rpush(Q, element("j"))
    runner = rig.runner("w1", retry_seconds=0.2)
    runner.process(runner.queue.fetch(0.1))
    body = redis_client.hget(keys.OUTBOX, "j")
    assert json.loads(body)["status"] == "completed"
    assert not redis_client.exists(keys.outbox_lease("j"))  # the sender may take it at once
    assert held(redis_client, "w1") == [] and redis_client.exists(keys.done("j"))
    supabase_standin.set_down(False)
    assert OutboxSender(rig.transport(), rig.callbacks()).drain_once() == 1
    assert supabase_standin.wait_for("j", timeout=5).raw == body


def test_a_refused_callback_is_kept_in_the_rejected_hash(rig, redis_client, supabase_standin):
    supabase_standin.fail_next(2, 400)   # the processing callback and the terminal one
    redis_client.rpush(Q, element("j"))
    runner = rig.runner("w1")
    runner.process(runner.queue.fetch(0.1))
    kept = redis_client.hget(keys.REJECTED, "j")
    assert kept is not None and json.loads(kept)["status"] == "completed"
    assert redis_client.hlen(keys.OUTBOX) == 0 and not redis_client.exists(keys.outbox_lease("j"))


def test_a_dead_lettered_jobs_callback_survives_a_cold_stop_during_its_delivery(redis_server, redis_client,
                                                                                 supabase_standin, tmp_path):
    """#1 as the review states it: JOB_MAX_ATTEMPTS=1, a handler raising RetryableError, a callback endpoint
    answering 503, and a cold stop (SIGINT) while the worker is still retrying the failed callback."""
    # The cold stop does not wait for the delivery to end (WORKER_COLD_STOP_SETTLE_SECONDS=0): the process
    # exits in the middle of it.
    env = runtime_env(redis_server.url, supabase_standin, tmp_path / "storage", JOB_MAX_ATTEMPTS="1",
                      CALLBACK_RETRY_SECONDS="6", CALLBACK_TIMEOUT_SECONDS="1", WORKER_COLD_STOP_SETTLE_SECONDS="0")
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log").wait_healthy()
    try:
        supabase_standin.set_down(True)
        redis_client.rpush(Q, element("poison", retryable=True))
        wait_until(lambda: redis_client.llen(keys.dead(Q)), 15, "the dead-letter")
        worker.stop(signal.SIGINT, timeout=20)
    finally:
        worker.close()
    body = redis_client.hget(keys.OUTBOX, "poison")
    assert body is not None, "the failed callback lived only in the stopped process's memory"
    assert json.loads(body)["status"] == "failed" and json.loads(body)["metadata"]["error_type"] == "STORAGE_ERROR"
    assert redis_client.llen(Q) == 0 and [k for k in redis_client.keys(f"{Q}:processing:*")] == []
    supabase_standin.set_down(False)
    wait_until(lambda: not redis_client.exists(keys.outbox_lease("poison")), 30, "the lease to lapse")
    client = CallbackClient(supabase_standin.url, SUPABASE_TEST_SERVICE_KEY, SUPABASE_TEST_CALLBACK_SECRET,
                            retry_seconds=1, timeout=2)
    assert OutboxSender(RedisProtocolTransport(redis_server.url, 5), client).drain_once() == 1
    assert [c.raw for c in supabase_standin.callbacks("poison", "failed")] == [body]


# -- #22a: a hand-back never decrements an attempt that was not counted ------------------------------------
class HandBackFirst:
    """A transport that makes a cold stop land right after the fetch: before the runner's first command on
    the fetched job, it calls ``runner.hand_back_current()`` (as the signal thread would at that instant)."""

    def __init__(self, inner):
        self.inner, self.can_block, self.runner, self.armed = inner, inner.can_block, None, False
        self.attempts_after_hand_back = "not handed back"

    def blocking_move(self, *args):
        moved = self.inner.blocking_move(*args)
        self.armed = moved is not None
        return moved

    def command(self, *args):
        if self.armed:
            self.armed = False
            self.runner.hand_back_current()
            self.attempts_after_hand_back = self.inner.command("HGET", keys.attempts(Q), "j")
        return self.inner.command(*args)

    def close(self):
        self.inner.close()


def test_a_cold_stop_before_the_attempt_is_counted_does_not_decrement_it(rig, redis_client, supabase_standin):
    transport = HandBackFirst(rig.transport())
    runner = rig.runner("w1", queue=rig.queue("w1", transport))
    transport.runner = runner
    redis_client.rpush(Q, element("j"))
    runner.process(runner.queue.fetch(0.1))
    assert int(transport.attempts_after_hand_back or 0) == 0
    assert int(redis_client.hget(keys.attempts(Q), "j") or 0) == 0
    assert redis_client.lrange(Q, 0, -1) == [element("j")] and held(redis_client, "w1") == []
    assert not redis_client.exists(keys.claim("j")) and supabase_standin.callbacks("j") == []


def test_a_counted_hand_back_keeps_the_attempt_and_an_uncounted_one_undoes_it(rig, redis_client):
    for count, expected in ((True, 1), (False, 0)):
        redis_client.flushall()
        hold = Hold("w1", patience=5)
        runner = rig.runner("w1", Scripted("w1", hold))
        redis_client.rpush(Q, element("j"))
        worker = process_on_a_thread(runner)
        hold.started.wait(5)
        assert runner.claim == ("j", "w1:1")
        assert runner.hand_back_current(count_attempt=count) is True
        hold.released.set()
        worker.join(5)
        assert int(redis_client.hget(keys.attempts(Q), "j")) == expected
        assert redis_client.lrange(Q, 0, -1) == [element("j")]
        assert not redis_client.exists(keys.claim("j"))  # the next worker may start it at once
        assert redis_client.hlen(keys.OUTBOX) == 0 and rig.stored("j") is None  # the run's result is discarded


# -- #5, runner half: the circuit breaker --------------------------------------------------------------------
class Trips:
    def __init__(self):
        self.calls = []

    def __call__(self, code, reason):
        self.calls.append((code, reason))


def test_a_broken_worker_trips_after_n_infrastructure_failures_and_hands_the_job_back_uncounted(
        rig, redis_client, supabase_standin):
    """The review's black hole: a handler failing every job with a CUDA error. Today it dead-letters the whole
    queue; with the breaker it stops after WORKER_BREAKER_THRESHOLD (5) consecutive failures."""
    ids = [f"j{n}" for n in range(10)]
    redis_client.rpush(Q, *[element(i) for i in ids])
    trips = Trips()
    runner = rig.runner("w1", Scripted("w1", raises(RuntimeError("CUDA error: an illegal memory access"))),
                        trip=trips, breaker_pause=0.01)
    stop = rig.loop(runner)
    wait_until(lambda: trips.calls or redis_client.llen(keys.dead(Q)) > 3, 30, "the breaker or the dead list")
    time.sleep(0.3)  # a loop that did not stop would go on taking jobs
    stop.set()
    assert [code for code, _ in trips.calls] == [ExitCode.BREAKER_OPEN]
    assert "5" in trips.calls[0][1]
    # j0 failed 3 times (one poison job alone never trips it) and is dead; j1's 2nd attempt tripped the breaker:
    # it went back to the head with that attempt undone; nothing else was taken.
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [element("j0")]
    assert redis_client.lrange(Q, 0, -1) == [element(i) for i in ids[1:]]
    assert int(redis_client.hget(keys.attempts(Q), "j1")) == 1
    assert not redis_client.exists(keys.claim("j1")) and held(redis_client, "w1") == []
    assert supabase_standin.callbacks("j1", "failed") == []


@pytest.mark.parametrize("where", ["handler", "before_job"])
def test_a_fatal_worker_error_trips_at_once(where, rig, redis_client, supabase_standin):
    trips = Trips()
    fatal = raises(FatalWorkerError("the GPU is gone"))
    kw = {"before_job": lambda: fatal(None, None)} if where == "before_job" else {}
    runner = rig.runner("w1", Scripted("w1", fatal if where == "handler" else None), trip=trips,
                        breaker_pause=0.01, **kw)
    redis_client.rpush(Q, element("j"), element("k"))
    stop = rig.loop(runner)
    wait_until(lambda: trips.calls, 10, "the trip")
    time.sleep(0.2)
    stop.set()
    assert trips.calls == [(ExitCode.FATAL_WORKER_ERROR, "the GPU is gone")]
    assert redis_client.lrange(Q, 0, -1) == [element("j"), element("k")]
    assert int(redis_client.hget(keys.attempts(Q), "j") or 0) == 0
    assert supabase_standin.callbacks("j", "failed") == []


def run_plan(rig, redis_client, plan):
    """One job per entry of ``plan`` (``oom``: an infrastructure failure, ``invalid``/``prompt``: the job's own
    fault, ``ok``: success), one attempt each; returns the breaker's trips once the queue stopped moving."""
    ids = [f"j{n}" for n in range(len(plan))]
    errors = {"oom": RetryableError("out of GPU memory", ErrorType.OOM_ERROR),
              "invalid": InvalidJob("bad field"), "prompt": WorkerError("bad prompt", ErrorType.INVALID_PROMPT)}

    def behaviour(job, progress):
        kind = plan[ids.index(job.id)]
        if kind == "ok":
            return made_by("w1")
        raise errors[kind]
    trips = Trips()
    runner = rig.runner("w1", Scripted("w1", behaviour), trip=trips, max_attempts=1, breaker_pause=0.01)
    redis_client.rpush(Q, *[element(i) for i in ids])
    stop = rig.loop(runner)
    wait_until(lambda: trips.calls or (redis_client.llen(Q) == 0 and not held(redis_client, "w1")), 20,
               "the trip or the queue to drain")
    stop.set()
    return trips.calls, ids


def test_job_faults_neither_count_nor_reset_the_breaker(rig, redis_client):
    calls, ids = run_plan(rig, redis_client, ["oom"] * 4 + ["invalid", "prompt"] + ["oom"])
    assert [code for code, _ in calls] == [ExitCode.BREAKER_OPEN]
    assert redis_client.lrange(Q, 0, -1) == [element(ids[-1])]  # the fifth infrastructure failure, handed back
    assert int(redis_client.hget(keys.attempts(Q), ids[-1]) or 0) == 0


def test_a_success_resets_the_breaker(rig, redis_client):
    calls, _ = run_plan(rig, redis_client, ["oom"] * 4 + ["ok"] + ["oom"] * 4)
    assert calls == []


def test_before_job_runs_under_the_gpu_lock_so_an_unload_cannot_slip_in_before_the_job(rig, redis_client,
                                                                                       supabase_standin):
    """#14: the reload check (``before_job``) and the job hold the GPU lock together, so `/memory/unload`
    (which needs the lock) cannot unload between "the model is loaded" and the job using it."""
    lock = threading.Lock()
    seen = []
    runner = rig.runner("w1", gpu_lock=lock, before_job=lambda: seen.append(lock.locked()))
    redis_client.rpush(Q, element("j"))
    runner.process(runner.queue.fetch(0.1))
    assert supabase_standin.wait_for("j", timeout=5).body["status"] == "completed"
    assert seen == [True]


# -- #4, runner half: the per-job deadline -------------------------------------------------------------------
def test_a_job_past_its_deadline_is_cancelled_at_its_next_progress_call_and_retried_then_dead(
        rig, redis_client, supabase_standin):
    calls = []

    def slow(job, progress):  # a diffusion loop: one progress call per step, 50 ms a step, for 10 s
        for step in range(200):
            calls.append(step)
            progress(step / 200, "step")
            time.sleep(0.05)
        return made_by("w1")
    runner = rig.runner("w1", Scripted("w1", slow), timeouts=JobTimeouts(sdxl=0.3), breaker_pause=0.01)
    redis_client.rpush(Q, element("slow"))
    stop = rig.loop(runner)
    failed = supabase_standin.wait_for("slow", status="failed", timeout=15).body
    stop.set()
    assert failed["metadata"]["error_type"] == "TIMEOUT_ERROR" and failed["metadata"]["retryable"] is True
    assert len(supabase_standin.callbacks("slow", "processing")) == 3  # retried like any retryable failure
    assert len(calls) < 3 * 20  # each run stopped within a few steps of its 0.3 s deadline
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [element("slow")]
    wait_until(lambda: runner.current is None, 5, "the runner to finish the job")
    assert runner.deadline is None  # no job, no deadline


def test_the_deadline_is_exposed_per_job_type_while_the_job_runs(rig, redis_client):
    seen = []
    runner = rig.runner("w1", Scripted("w1", lambda job, progress: seen.append(runner.deadline) or made_by("w")),
                        timeouts=JobTimeouts(sdxl=42.0))
    redis_client.rpush(Q, element("j"))
    before = time.monotonic()
    runner.process(runner.queue.fetch(0.1))
    assert len(seen) == 1 and before + 42.0 <= seen[0] <= time.monotonic() + 42.0
    types = ("video_high", "wan_video_fast", "image7b_fast_enhanced", "chat_enhance", "admin_utilities",
             "sdxl_image_high")
    assert [JobTimeouts().seconds_for(JobType.parse(t)) for t in types] == [1200.0, 1200.0, 300.0, 120.0, 120.0,
                                                                            300.0]

"""The job loop in the test process, in burst mode (rq's ``work(burst=True)``, arq's ``burst``): the real
``Runner`` drains a real Redis queue and returns, posting callbacks to and storing files in the loopback Supabase
stand-in, over a fake clock whose sleeps are recorded, so retries and backoff take no time.

Each test pushes elements, runs one burst and checks what a worker's peers and the app would see: the callbacks,
the stored objects, the queue, the processing list, the dead list, the attempts, the claim and the outbox.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from common import keys
from common.exit_codes import ExitCode
from tests.conftest import SUPABASE_TEST_SERVICE_KEY
from tests.core.rig import Q, Rig, Scripted, element, held, made_by, wait_until
from tests.core.scripted import FakeTime
from tests.fakes.handlers import FakeHandler
from workers.core import queue as queue_mod
from workers.core.errors import ErrorType, FatalWorkerError, JobCancelled, RetryableError
from workers.core.handler import Progress, Result
from workers.core.job import Job, Queue
from workers.core.metrics import Metrics
from workers.core.runner import JobTimeouts, Runner
from workers.core.storage import TRIES, SupabaseStorage
from workers.core.transport import RedisProtocolTransport, TransportError

BUCKET = "results"


class Burst:
    """One worker's job loop as the service builds it, over fake time; ``trips`` records the escalations."""

    def __init__(self, rig: Rig, handler: Any, **options: Any):
        self.time = FakeTime()
        self.trips: list[tuple[ExitCode, str]] = []
        storage = SupabaseStorage(rig.standin.url, SUPABASE_TEST_SERVICE_KEY, BUCKET, sleep=lambda s: None)
        built = {"queue": rig.queue("w1"), "callbacks": rig.callbacks(), "storage": storage, "metrics": Metrics(),
                 "worker_id": "w1", "clock": self.time.clock, "sleep": self.time.sleep,
                 "trip": lambda code, reason: self.trips.append((code, reason))}
        self.runner = Runner(handler=handler, **{**built, **options})

    def run(self, timeout: float = 30.0) -> None:
        """``run(stop, burst=True)`` must return by itself; a loop still running after ``timeout`` fails."""
        stop = threading.Event()
        thread = threading.Thread(target=self.runner.run, args=(stop, True), daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            stop.set()
            thread.join(10)
            raise AssertionError(f"the burst did not return within {timeout:g} s")


def steps(*script: Exception | Callable[[Job, Progress], Any] | None) -> Callable[[Job, Progress], Result]:
    """A behaviour for ``Scripted``: run ``n`` raises ``script[n]`` if it is an exception, calls it if it is a
    function, then (for ``None`` and functions) returns a result; runs past the script succeed."""
    runs = iter(script)

    def behaviour(job: Job, progress: Progress) -> Result:
        step = next(runs, None)
        if isinstance(step, Exception):
            raise step
        if step is not None:
            step(job, progress)
        return made_by("w1")
    return behaviour


def statuses(standin, job_id: str) -> list[str]:
    return [c.status for c in standin.callbacks(job_id) if c.status != "processing"]


def attempts_reported(standin, job_id: str, runs: int) -> list[int]:
    """The attempt numbers of the job's ``processing`` callbacks (sent in the background: waited for)."""
    wait_until(lambda: len(standin.callbacks(job_id, "processing")) >= runs, 5, f"{runs} processing callbacks")
    return sorted(c.body["metadata"]["attempt"] for c in standin.callbacks(job_id, "processing"))


def assert_left_nothing(redis_client, job_id: str) -> None:
    """The job reached its terminal state: nothing of it is held, claimed, counted or owed any more."""
    assert held(redis_client, "w1") == [] and redis_client.llen(Q) == 0
    assert not redis_client.exists(keys.claim(job_id)) and redis_client.hget(keys.attempts(Q), job_id) is None
    assert redis_client.exists(keys.done(job_id)) and redis_client.hlen(keys.OUTBOX) == 0


def dead_reasons(redis_client) -> list[str]:
    return [json.loads(entry)["reason"] for entry in redis_client.lrange(keys.dead_log(Q), 0, -1)]


def test_a_burst_runs_every_job_then_returns_with_callbacks_and_files_in_storage(rig, transport, redis_client,
                                                                              supabase_standin):
    """On both transports: Redis blocks on an empty queue for a moment, Upstash REST polls it once."""
    redis_client.rpush(Q, element("j1", images=2), element("j2"))
    burst = Burst(rig, FakeHandler(Queue.SDXL), queue=rig.queue("w1", transport=transport))
    burst.run()
    assert burst.runner.jobs_done == 2 and burst.trips == [] and burst.time.sleeps == []
    first = supabase_standin.wait_for("j1", timeout=1).body
    assert [a["url"] for a in first["assets"]] == ["user-1/j1/0.png", "user-1/j1/1.png"]
    assert [a["thumbnail_url"] for a in first["assets"]] == ["user-1/j1/0.thumb.webp", "user-1/j1/1.thumb.webp"]
    objects = supabase_standin.objects
    for asset in first["assets"]:
        data, content_type = objects[f"{BUCKET}/{asset['url']}"]
        assert data.startswith(b"\x89PNG") and content_type == "image/png"
        assert asset["metadata"]["file_size_bytes"] == len(data)
        assert objects[f"{BUCKET}/{asset['thumbnail_url']}"][1] == "image/webp"
    assert first["metadata"]["worker_id"] == "w1" and first["metadata"]["job_type"] == "sdxl_image_fast"
    assert statuses(supabase_standin, "j2") == ["completed"] and f"{BUCKET}/user-1/j2/0.png" in objects
    for job_id in ("j1", "j2"):
        assert attempts_reported(supabase_standin, job_id, 1) == [1]
        assert_left_nothing(redis_client, job_id)
    assert redis_client.llen(keys.dead(Q)) == 0


def test_a_burst_on_an_empty_queue_returns_at_once(rig, redis_client, supabase_standin):
    handler = Scripted("w1")
    burst = Burst(rig, handler)
    burst.run(timeout=5)
    assert handler.runs == [] and supabase_standin.callbacks() == [] and burst.time.sleeps == []


RETRIES = {
    # name: (what the first runs raise, runner options, the pauses the runner slept, in order)
    "a retryable error's own delay": ([RetryableError("flaky", ErrorType.STORAGE_ERROR, delay=7.0)], {}, [7.0]),
    "unexpected errors back off a step each": ([RuntimeError("CUDA error"), RuntimeError("CUDA error")],
                                               {"breaker_pause": 2.0}, [2.0, 4.0]),
    "an out-of-memory error": ([RetryableError("out of GPU memory", ErrorType.OOM_ERROR)],
                               {"breaker_pause": 3.0}, [3.0]),
}


@pytest.mark.parametrize("case", list(RETRIES))
def test_a_retryable_failure_is_retried_after_its_pause_then_completes(case, rig, redis_client, supabase_standin):
    failures, options, pauses = RETRIES[case]
    handler = Scripted("w1", steps(*failures))
    redis_client.rpush(Q, element("j"))
    burst = Burst(rig, handler, **options)
    burst.run()
    assert handler.runs == ["j"] * (len(failures) + 1)
    assert burst.time.sleeps == pauses
    assert statuses(supabase_standin, "j") == ["completed"]
    assert attempts_reported(supabase_standin, "j", len(failures) + 1) == list(range(1, len(failures) + 2))
    assert_left_nothing(redis_client, "j")
    assert burst.trips == [] and redis_client.llen(keys.dead(Q)) == 0


def test_a_storage_outage_fails_the_attempt_and_the_retry_stores_the_files(rig, redis_client, supabase_standin):
    supabase_standin.fail_storage_next(TRIES)   # every try of the first attempt's upload
    redis_client.rpush(Q, element("j"))
    handler = Scripted("w1")
    Burst(rig, handler).run()
    assert handler.runs == ["j", "j"] and statuses(supabase_standin, "j") == ["completed"]
    assert supabase_standin.objects[f"{BUCKET}/user-1/j/0.png"][0] == b"made by w1"
    assert_left_nothing(redis_client, "j")


def test_a_permanent_failure_is_reported_failed_once_and_never_retried(rig, redis_client, supabase_standin):
    redis_client.rpush(Q, element("j", fail="INVALID_PROMPT"), element("k"))
    burst = Burst(rig, FakeHandler(Queue.SDXL))
    burst.run()
    [failed] = supabase_standin.callbacks("j", "failed")
    assert failed.body["metadata"]["error_type"] == "INVALID_PROMPT" and failed.body["metadata"]["retryable"] is False
    assert failed.body["error_message"] == "the fake handler was told to fail" and failed.body["assets"] == []
    assert statuses(supabase_standin, "j") == ["failed"] and attempts_reported(supabase_standin, "j", 1) == [1]
    assert not any(key.startswith(f"{BUCKET}/user-1/j/") for key in supabase_standin.objects)
    assert burst.time.sleeps == [] and statuses(supabase_standin, "k") == ["completed"]
    assert_left_nothing(redis_client, "j")
    assert redis_client.llen(keys.dead(Q)) == 0


def test_an_undecodable_element_goes_to_the_dead_list_and_the_burst_goes_on(rig, redis_client, supabase_standin):
    handler = Scripted("w1")
    redis_client.rpush(Q, b"not a job", element("k"))
    Burst(rig, handler).run()
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [b"not a job"]
    assert [reason.split(":")[0] for reason in dead_reasons(redis_client)] == ["undecodable"]
    assert handler.runs == ["k"] and [c.job_id for c in supabase_standin.callbacks()
                                      if c.status != "processing"] == ["k"]
    assert held(redis_client, "w1") == [] and redis_client.llen(Q) == 0


def test_an_invalid_job_with_an_id_is_failed_without_running(rig, redis_client, supabase_standin):
    handler = Scripted("w1")
    redis_client.rpush(Q, json.dumps({"id": "j", "type": "sdxl_image_fast", "user_id": "u", "config": "nope"}))
    Burst(rig, handler).run()
    [failed] = supabase_standin.callbacks("j", "failed")
    assert failed.body["metadata"]["error_type"] == "INVALID_JOB" and handler.runs == []
    assert supabase_standin.callbacks("j", "processing") == []
    assert_left_nothing(redis_client, "j")


def test_a_job_that_fails_every_attempt_goes_to_the_dead_list(rig, redis_client, supabase_standin):
    flaky = RetryableError("flaky", ErrorType.STORAGE_ERROR, delay=5.0)
    handler = Scripted("w1", steps(flaky, flaky, flaky, flaky))
    redis_client.rpush(Q, element("j"))
    burst = Burst(rig, handler, max_attempts=3)
    burst.run()
    assert handler.runs == ["j"] * 3 and burst.time.sleeps == [5.0, 5.0]   # no pause after the last attempt
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [element("j")]
    assert dead_reasons(redis_client) == ["STORAGE_ERROR on the last attempt"]
    [failed] = supabase_standin.callbacks("j", "failed")
    assert failed.body["metadata"]["error_type"] == "STORAGE_ERROR"
    assert statuses(supabase_standin, "j") == ["failed"]
    assert_left_nothing(redis_client, "j")


def test_a_job_past_its_deadline_is_cancelled_at_its_next_progress_and_retried(rig, redis_client,
                                                                              supabase_standin):
    """The deadline is read on the runner's clock: an overrun is a jump of the fake clock, not a wait."""
    raised: list[Exception] = []
    burst: Burst

    def overrun(job: Job, progress: Progress) -> None:
        progress(0.1, "started")
        burst.time.now += 301.0
        try:
            progress(0.5, "halfway")
        except JobCancelled as exc:
            raised.append(exc)
            raise
    handler = Scripted("w1", steps(overrun))
    burst = Burst(rig, handler, timeouts=JobTimeouts(sdxl=300.0))
    redis_client.rpush(Q, element("j"))
    burst.run()
    assert [(type(e), e.error_type, e.reason) for e in raised] == [(JobCancelled, ErrorType.TIMEOUT_ERROR, "deadline")]
    assert handler.runs == ["j", "j"] and statuses(supabase_standin, "j") == ["completed"]
    assert attempts_reported(supabase_standin, "j", 2) == [1, 2]
    assert_left_nothing(redis_client, "j")


def test_a_job_past_its_deadline_on_every_attempt_is_failed_with_a_timeout(rig, redis_client, supabase_standin):
    def overrun(job: Job, progress: Progress) -> None:
        burst.time.now += 61.0
        progress(0.5)
    handler = Scripted("w1", steps(overrun, overrun))
    burst = Burst(rig, handler, max_attempts=2, timeouts=JobTimeouts(sdxl=60.0))
    redis_client.rpush(Q, element("j"))
    burst.run()
    [failed] = supabase_standin.callbacks("j", "failed")
    assert failed.body["metadata"]["error_type"] == "TIMEOUT_ERROR" and handler.runs == ["j", "j"]
    assert burst.time.sleeps == []   # a cancelled job is retried at once: the deadline was its own fault
    assert redis_client.lrange(keys.dead(Q), 0, -1) == [element("j")]
    assert_left_nothing(redis_client, "j")


@pytest.mark.parametrize("where", ["handler", "before_job"])
def test_a_fatal_worker_error_hands_the_job_back_uncounted_escalates_and_stops(where, rig, redis_client,
                                                                             supabase_standin):
    fatal = FatalWorkerError("the GPU is gone")

    def gone() -> None:
        raise fatal
    handler = Scripted("w1", steps(fatal) if where == "handler" else None)
    options = {"before_job": gone} if where == "before_job" else {}
    redis_client.rpush(Q, element("j"), element("k"))
    burst = Burst(rig, handler, **options)
    burst.run()
    assert burst.trips == [(ExitCode.FATAL_WORKER_ERROR, "the GPU is gone")] and burst.runner.stopped
    assert redis_client.lrange(Q, 0, -1) == [element("j"), element("k")]   # back at the head, k never taken
    assert int(redis_client.hget(keys.attempts(Q), "j") or 0) == 0
    assert not redis_client.exists(keys.claim("j")) and held(redis_client, "w1") == []
    assert statuses(supabase_standin, "j") == [] and handler.runs == (["j"] if where == "handler" else [])
    assert redis_client.hlen(keys.OUTBOX) == 0 and not redis_client.exists(keys.done("j"))


def test_while_redis_is_away_the_loop_backs_off_on_the_injected_sleep(rig):
    """Nothing listens on the queue's port: every fetch fails (a burst does not take that for an empty queue),
    and the loop waits 1, 2, 4, 8 s between them; the stop comes during the fourth wait."""
    stop, slept = threading.Event(), []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            stop.set()
    unreachable = RedisProtocolTransport("redis://127.0.0.1:9/0", timeout=0.5)
    burst = Burst(rig, Scripted("w1"), queue=rig.queue("w1", transport=unreachable), sleep=sleep)
    thread = threading.Thread(target=burst.runner.run, args=(stop, True), daemon=True)
    thread.start()
    thread.join(20)
    stop.set()
    assert not thread.is_alive() and slept == [1.0, 2.0, 4.0, 8.0]


class SettleRefused(RedisProtocolTransport):
    """Real Redis, except that the first ``refusals`` terminal steps are refused before they reach it."""

    def __init__(self, url: str, refusals: int):
        super().__init__(url, timeout=5)
        self.refusals = refusals

    def command(self, *args: Any) -> Any:
        if args[:2] == ("EVAL", queue_mod._SETTLE) and self.refusals:
            self.refusals -= 1
            raise TransportError("redis: ConnectionError: refused by the test")
        return super().command(*args)


def test_a_terminal_step_is_retried_across_an_outage_on_the_injected_sleep(rig, redis_server, redis_client,
                                                                           supabase_standin):
    refusing = SettleRefused(redis_server.url, refusals=3)
    burst = Burst(rig, Scripted("w1"), queue=rig.queue("w1", transport=refusing))
    redis_client.rpush(Q, element("j"))
    burst.run()
    assert refusing.refusals == 0 and burst.time.sleeps == [0.5, 1.0, 2.0]
    assert statuses(supabase_standin, "j") == ["completed"]
    assert_left_nothing(redis_client, "j")

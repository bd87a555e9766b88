"""Jobs the app cancelled are not run (issue 16 §1): the job loop in the test process, on the real redis-server
(both transports for the terminal step), the loopback Supabase stand-in's ``jobs`` table over real HTTP
(``GET /rest/v1/jobs``) and real files.

A job cancelled before it starts never reaches its handler; one cancelled while it runs stops at its next
``progress`` call after the lookup answered; neither uploads nor sends a terminal callback, and both are
acknowledged for good (done marker, nothing owed) and counted. A lookup that fails (500, a hang, a malformed
answer, nobody listening) runs the job as before. Lookups are throttled: one before the start, then at most one
per interval, never two at once.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from flask import Flask, Response

from common import keys
from common.errors import ConfigError
from common.settings import Settings
from local.net import BackgroundServer, free_port
from tests.conftest import SUPABASE_TEST_SERVICE_KEY
from tests.core.rig import Q, Scripted, element, held, made_by, wait_until
from workers.core.cancellation import CancelChecks, JobStatusLookup, Verdict
from workers.core.handler import Progress, Result
from workers.core.job import Job
from workers.core.metrics import Metrics
from workers.core.runner import Runner

STEP = 0.05


class CountedLookup(JobStatusLookup):
    """The real lookup, noting when each answer came and what it was (to tell "within one step" apart)."""

    def __init__(self, url: str, timeout: float = 0.5):
        super().__init__(url, SUPABASE_TEST_SERVICE_KEY, timeout=timeout)
        self.answers: list[tuple[float, Verdict]] = []

    def verdict(self, job_id: str) -> Verdict:
        answer = super().verdict(job_id)
        self.answers.append((time.monotonic(), answer))
        return answer


def checks(standin, every: float = 0.2, timeout: float = 0.5) -> CancelChecks:
    return CancelChecks(CountedLookup(standin.url, timeout), every)


class Steps:
    """A handler behaviour of ``count`` steps of ``STEP`` s, each followed by ``progress`` (as a diffusion
    loop calls it); ``at_step`` runs before a given step (the app cancels the job then)."""

    def __init__(self, count: int, at_step: dict[int, Callable[[], Any]] | None = None):
        self.count, self.at_step = count, at_step or {}
        self.done: list[float] = []   # when each step's progress call returned

    def __call__(self, job: Job, progress: Progress) -> Result:
        for step in range(self.count):
            self.at_step.get(step, lambda: None)()
            time.sleep(STEP)
            progress((step + 1) / self.count, f"step {step + 1}/{self.count}")
            self.done.append(time.monotonic())
        return made_by("w1")


def cancelled_count(metrics: Metrics, job_type: str = "sdxl_image_fast") -> float:
    """The ``jobs`` counter's ``cancelled`` outcome, read by label (whatever the metric's name)."""
    return sum(sample.value for family in metrics.jobs.collect() for sample in family.samples
               if sample.name.endswith("_total")
               and sample.labels == {"job_type": job_type, "outcome": "cancelled"})


def assert_acknowledged_for_good(redis_client, job_id: str) -> None:
    """Gone from the queue and the processing list, claim released, marked done, no callback owed."""
    assert held(redis_client, "w1") == [] and redis_client.llen(Q) == 0
    assert not redis_client.exists(keys.claim(job_id)) and redis_client.hget(keys.attempts(Q), job_id) is None
    assert redis_client.exists(keys.done(job_id))
    assert redis_client.hget(keys.OUTBOX, job_id) is None and not redis_client.exists(keys.outbox_lease(job_id))


def run_one(runner: Runner) -> None:
    runner.process(runner.queue.fetch(0.5))


# -- before the job starts ---------------------------------------------------------------------------------
def test_a_job_cancelled_before_it_starts_is_acknowledged_without_running(rig, transport, redis_client,
                                                                         supabase_standin):
    supabase_standin.set_job_status("c1", "cancelled")
    redis_client.rpush(Q, element("c1"))
    handler = Scripted("w1")
    runner = rig.runner("w1", handler, queue=rig.queue("w1", transport=transport), cancel=checks(supabase_standin))
    run_one(runner)
    assert handler.runs == []
    assert_acknowledged_for_good(redis_client, "c1")
    assert cancelled_count(runner.metrics) == 1 and runner.jobs_done == 1
    time.sleep(0.3)   # a processing callback would be on its way in the background by now
    assert supabase_standin.callbacks("c1") == [] and supabase_standin.jobs_table.lookups("c1") == 1
    assert rig.stored("c1") is None
    # A copy pushed again (a producer's retry) is dropped as done: it is never run.
    redis_client.rpush(Q, element("c1"))
    run_one(runner)
    assert handler.runs == [] and redis_client.llen(Q) == 0 and held(redis_client, "w1") == []


def test_the_cancellation_is_logged_once_with_the_job_id_and_type(rig, redis_client, supabase_standin, caplog):
    supabase_standin.set_job_status("c2", "cancelled")
    redis_client.rpush(Q, element("c2"))
    with caplog.at_level("INFO", logger="workers.core.runner"):
        run_one(rig.runner("w1", cancel=checks(supabase_standin)))
    lines = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()]
    assert len(lines) == 1 and "c2" in lines[0] and "sdxl_image_fast" in lines[0] and "before it started" in lines[0]


def test_jobs_the_app_did_not_cancel_run_as_before(rig, redis_client, supabase_standin):
    """A row in another state, and no row at all (a job the app does not know): both run and complete."""
    supabase_standin.set_job_status("r1", "queued")
    redis_client.rpush(Q, element("r1"), element("r2"))
    runner = rig.runner("w1", cancel=checks(supabase_standin))
    run_one(runner)
    run_one(runner)
    for job_id in ("r1", "r2"):
        assert supabase_standin.wait_for(job_id, timeout=5).status == "completed"
        assert rig.stored(job_id) == b"made by w1"
    assert cancelled_count(runner.metrics) == 0


# -- while it runs ------------------------------------------------------------------------------------------
def test_a_job_cancelled_mid_run_stops_within_one_step_and_uploads_nothing(rig, transport, redis_client,
                                                                          supabase_standin):
    steps = Steps(200, {5: lambda: supabase_standin.set_job_status("m1", "cancelled")})
    handler = Scripted("w1", steps)
    cancel = checks(supabase_standin, every=0.2)
    runner = rig.runner("w1", handler, queue=rig.queue("w1", transport=transport), cancel=cancel)
    redis_client.rpush(Q, element("m1"))
    began = time.monotonic()
    run_one(runner)
    assert handler.runs == ["m1"] and len(steps.done) < 200
    answered = next(at for at, verdict in cancel.lookup.answers if verdict is Verdict.CANCELLED)
    assert sum(1 for at in steps.done if at > answered) <= 1, "steps ran after the cancellation was known"
    assert time.monotonic() - began < 3.0   # the whole job would take 10 s
    assert rig.stored("m1") is None and not (rig.storage_root / "user-1" / "m1").exists()
    assert_acknowledged_for_good(redis_client, "m1")
    assert cancelled_count(runner.metrics) == 1
    time.sleep(0.2)
    assert [c.status for c in supabase_standin.callbacks("m1")] == ["processing"]


def test_an_answer_that_comes_after_the_last_step_still_uploads_nothing(rig, redis_client, supabase_standin):
    """The cancellation lands while the handler works without a progress call (an encoder, a VAE decode)."""
    def behaviour(job: Job, progress: Progress) -> Result:
        supabase_standin.set_job_status("e1", "cancelled")
        time.sleep(0.25)   # the interval passes
        progress(0.9, "encoding")   # starts a lookup in the background and returns at once
        time.sleep(0.4)    # the lookup answers meanwhile
        return made_by("w1")

    runner = rig.runner("w1", Scripted("w1", behaviour), cancel=checks(supabase_standin, every=0.2))
    redis_client.rpush(Q, element("e1"))
    run_one(runner)
    assert rig.stored("e1") is None and cancelled_count(runner.metrics) == 1
    assert_acknowledged_for_good(redis_client, "e1")
    assert [c.status for c in supabase_standin.callbacks("e1")] == ["processing"]


def test_progress_never_waits_for_a_slow_lookup(rig, redis_client, supabase_standin):
    """Lookups hang (1 s, longer than the interval): each progress call still returns at once, one lookup at a
    time is in flight, and the job completes."""
    supabase_standin.jobs_table.set_hanging(1.0)
    waits: list[float] = []

    def behaviour(job: Job, progress: Progress) -> Result:
        for step in range(30):
            time.sleep(STEP)
            before = time.monotonic()
            progress(step / 30)
            waits.append(time.monotonic() - before)
        return made_by("w1")

    runner = rig.runner("w1", Scripted("w1", behaviour), cancel=checks(supabase_standin, every=0.05, timeout=0.3))
    redis_client.rpush(Q, element("h1"))
    began = time.monotonic()
    run_one(runner)
    elapsed = time.monotonic() - began
    assert supabase_standin.wait_for("h1", timeout=5).status == "completed"
    assert max(waits) < 0.25, f"a progress call waited {max(waits):.3f} s"   # a lookup gives up after 0.3 s
    # One in flight at a time: each lookup gives up after its 0.3 s timeout (the first one is waited for).
    assert supabase_standin.jobs_table.lookups("h1") <= math.ceil(elapsed / 0.3) + 1


def test_lookups_are_throttled_to_one_per_interval(rig, redis_client, supabase_standin):
    steps = Steps(40)   # about 2 s of steps, a progress call every 50 ms
    cancel = checks(supabase_standin, every=0.5)
    runner = rig.runner("w1", Scripted("w1", steps), cancel=cancel)
    redis_client.rpush(Q, element("t1"))
    began = time.monotonic()
    run_one(runner)
    elapsed = time.monotonic() - began
    asked = supabase_standin.jobs_table.lookups("t1")
    assert 2 <= asked <= 1 + math.ceil(elapsed / 0.5), f"{asked} lookups in {elapsed:.2f} s"
    assert supabase_standin.wait_for("t1", timeout=5).status == "completed"


# -- lookups that fail: the job runs as before -------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["500", "hang", "down"])
def test_a_job_whose_lookup_fails_runs_and_completes(rig, redis_client, supabase_standin, failure):
    supabase_standin.set_job_status("f1", "cancelled")   # the row says so, but cannot be read
    if failure == "500":
        supabase_standin.jobs_table.set_failing(500)
    elif failure == "hang":
        supabase_standin.jobs_table.set_hanging(5.0)
    handler = Scripted("w1", Steps(4))
    lookup_timeout = 0.3
    cancel = checks(supabase_standin, every=0.05, timeout=lookup_timeout)
    if failure == "down":
        cancel = CancelChecks(CountedLookup(f"http://127.0.0.1:{free_port()}", lookup_timeout), 0.05)
    runner = rig.runner("w1", handler, cancel=cancel)
    redis_client.rpush(Q, element("f1"))
    began = time.monotonic()
    run_one(runner)
    assert handler.runs == ["f1"] and time.monotonic() - began < lookup_timeout + 4 * STEP + 1.0
    assert supabase_standin.wait_for("f1", timeout=5).status == "completed" and rig.stored("f1") == b"made by w1"
    assert cancelled_count(runner.metrics) == 0
    assert all(verdict is Verdict.UNKNOWN for _, verdict in cancel.lookup.answers)


# -- the lookup's verdicts -------------------------------------------------------------------------------------
class Answering(BackgroundServer):
    """A loopback server answering ``/rest/v1/jobs`` with a fixed status and body: the malformed answers."""

    def __init__(self, status: int, body: str):
        app = Flask("answering")
        app.add_url_rule("/rest/v1/jobs", "jobs", lambda: Response(body, status, mimetype="application/json"))
        super().__init__(app, name="answering")


@pytest.mark.parametrize(("status", "body"), [
    (200, "not json"), (200, '{"status": "cancelled"}'), (200, '[{"status": "cancelled"}, {"status": "x"}]'),
    (200, '[{"state": "cancelled"}]'), (200, '[{"status": 3}]'), (200, '["cancelled"]'), (404, "[]"),
    (503, '[{"status": "cancelled"}]')])
def test_malformed_or_failed_answers_are_unknown(status, body):
    server = Answering(status, body)
    try:
        assert JobStatusLookup(server.url, "k", timeout=1).verdict("j") is Verdict.UNKNOWN
    finally:
        server.stop()


def test_verdicts_from_the_standin(supabase_standin):
    lookup = JobStatusLookup(supabase_standin.url, SUPABASE_TEST_SERVICE_KEY, timeout=1)
    supabase_standin.set_job_status("a", "cancelled")
    supabase_standin.set_job_status("b", "processing")
    assert [lookup.verdict(j) for j in ("a", "b", "nobody")] == [Verdict.CANCELLED, Verdict.NOT_CANCELLED,
                                                                  Verdict.UNKNOWN]
    assert JobStatusLookup(supabase_standin.url, "wrong-key", timeout=1).verdict("a") is Verdict.UNKNOWN


# -- the stand-in's REST endpoint -------------------------------------------------------------------------------
def test_the_standin_serves_only_the_one_query_with_the_service_key(supabase_standin):
    supabase_standin.set_job_status("s1", "cancelled")
    url = f"{supabase_standin.url}/rest/v1/jobs"
    auth = {"apikey": SUPABASE_TEST_SERVICE_KEY, "Authorization": f"Bearer {SUPABASE_TEST_SERVICE_KEY}"}
    ok = requests.get(url, params={"id": "eq.s1", "select": "status"}, headers=auth, timeout=5)
    assert ok.status_code == 200 and ok.json() == [{"status": "cancelled"}]
    assert requests.get(url, params={"id": "eq.zz", "select": "status"}, headers=auth, timeout=5).json() == []
    for headers in ({}, {"apikey": SUPABASE_TEST_SERVICE_KEY}, {**auth, "Authorization": "Bearer nope"}):
        assert requests.get(url, params={"id": "eq.s1", "select": "status"}, headers=headers,
                            timeout=5).status_code == 401
    for params in ({"id": "eq.s1"}, {"id": "eq.s1", "select": "*"}, {"id": "neq.s1", "select": "status"},
                   {"id": "eq.s1", "select": "status", "limit": "1"}, {"select": "status"},
                   [("id", "eq.s1"), ("id", "eq.s2"), ("select", "status")]):
        assert requests.get(url, params=params, headers=auth, timeout=5).status_code == 400, params
    supabase_standin.jobs_table.set_failing(500)
    assert requests.get(url, params={"id": "eq.s1", "select": "status"}, headers=auth, timeout=5).status_code == 500
    supabase_standin.jobs_table.set_failing(None)
    supabase_standin.jobs_table.set_hanging(0.4)
    began = time.monotonic()
    assert requests.get(url, params={"id": "eq.s1", "select": "status"}, headers=auth, timeout=5).ok
    assert time.monotonic() - began >= 0.4
    assert supabase_standin.jobs_table.lookups("s1") == 10 and supabase_standin.jobs_table.lookups() == 13


def test_a_hanging_lookup_ends_when_the_standin_stops(supabase_standin):
    supabase_standin.jobs_table.set_hanging(30.0)
    lookup = JobStatusLookup(supabase_standin.url, SUPABASE_TEST_SERVICE_KEY, timeout=10)
    answer: list[Verdict] = []
    thread = threading.Thread(target=lambda: answer.append(lookup.verdict("x")))
    thread.start()
    wait_until(lambda: supabase_standin.jobs_table.lookups("x") == 1, 5, "the lookup to arrive")
    began = time.monotonic()
    supabase_standin.stop()
    thread.join(10)
    assert time.monotonic() - began < 6 and answer   # answered (or refused), not held for 30 s


# -- off ----------------------------------------------------------------------------------------------------
def test_checks_are_off_without_supabase_or_with_a_zero_interval(supabase_standin):
    base = {"SUPABASE_URL": supabase_standin.url, "SUPABASE_SERVICE_KEY": SUPABASE_TEST_SERVICE_KEY}
    on = CancelChecks.from_settings(Settings.from_env({**base, "CANCEL_CHECK_SECONDS": "2.5"}))
    assert on is not None and on.every == 2.5 and on.lookup.timeout == 2.0
    assert CancelChecks.from_settings(Settings.from_env(base)).every == 10.0
    assert CancelChecks.from_settings(Settings.from_env({**base, "CANCEL_CHECK_SECONDS": "0"})) is None
    assert CancelChecks.from_settings(Settings.from_env({})) is None
    for bad in ("-1", "soon", "4000"):
        with pytest.raises(ConfigError, match="CANCEL_CHECK_SECONDS"):
            Settings.from_env({**base, "CANCEL_CHECK_SECONDS": bad})


def test_a_runner_without_checks_never_asks(rig, redis_client, supabase_standin):
    supabase_standin.set_job_status("o1", "cancelled")
    redis_client.rpush(Q, element("o1"))
    run_one(rig.runner("w1", Scripted("w1", Steps(3))))
    assert supabase_standin.wait_for("o1", timeout=5).status == "completed"
    assert supabase_standin.jobs_table.lookups() == 0

"""The life cycle of a real worker process (``python -m workers`` under gunicorn, real Redis, the loopback
Supabase stand-in): its identity, the order of its stop, the cold stop against an in-flight settle, the
circuit breaker, the per-job watchdog, and the exit codes that reach the orchestrator (review #2, #5, #6, #7,
#17 and the second half of #4)."""
from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from common import keys
from common.exit_codes import ExitCode
from common.settings import Settings
from local.net import free_port
from tests.core.worker_procs import element, start
from tests.fleet.jobs import FAKE_TYPES, fake_element
from tests.procs import ROOT, WorkerProcess
from workers.core.service import default_worker_id

Q = "sdxl_queue"
TTL = 2   # WORKER_HEARTBEAT_TTL_SECONDS in tests.procs.runtime_env


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def held(redis_client) -> dict[str, list[bytes]]:
    return {k.decode(): redis_client.lrange(k, 0, -1) for k in redis_client.keys("*:processing:*")
            if redis_client.llen(k)}


def health(worker: WorkerProcess) -> tuple[int, dict]:
    answer = requests.get(f"{worker.url}/health", timeout=2)
    return answer.status_code, answer.json()


# -- identity (#6) ---------------------------------------------------------------------------------------------
def test_the_worker_id_is_per_process_and_worker_id_is_only_a_prefix():
    settings = Settings.from_env({"WORKER_ID": "pod-a"})
    first, second = default_worker_id(settings, "sdxl", 0), default_worker_id(settings, "sdxl", 0)
    assert re.fullmatch(r"pod-a-sdxl-0-[0-9a-f]{6}", first), first
    assert first != second
    pod = default_worker_id(Settings.from_env({"RUNPOD_POD_ID": "abc123"}), "wan", 2)
    assert re.fullmatch(r"abc123-wan-2-[0-9a-f]{6}", pod), pod


def test_a_shared_worker_id_does_not_hide_a_dead_sibling_from_the_reaper(procs, env, redis_client,
                                                                           supabase_standin, tmp_path):
    """One pod, WORKER_ID set pod-wide: the wan process dies holding a job while the sdxl process lives on."""
    pod = {**env, "WORKER_ID": "pod-a"}
    start(procs, {**pod, "FAKE_QUEUE": "sdxl_queue"}, slot=0, tmp_path=tmp_path)
    wan = start(procs, {**pod, "FAKE_QUEUE": "wan_queue"}, slot=0, tmp_path=tmp_path)
    redis_client.rpush("wan_queue", fake_element("stranded", "wan_queue", sleep=30))
    supabase_standin.wait_for("stranded", status="processing", timeout=10)
    wan.signal_group(signal.SIGKILL)   # arbiter and worker: nothing restarts it
    wan.proc.wait(5)
    killed_at = time.monotonic()
    wait_until(lambda: redis_client.llen("wan_queue"), 2 * TTL + 3, "the dead wan worker's job back in wan_queue")
    print(f"returned {time.monotonic() - killed_at:.1f} s after the kill")
    assert held(redis_client) == {}


def test_a_new_pod_with_the_same_worker_id_does_not_adopt_a_live_workers_job(procs, env, redis_client,
                                                                             supabase_standin, tmp_path):
    """Two pods from one template (same WORKER_ID, same slot): the second one's start-up must not take the
    first one's running job back to the queue (it would run twice)."""
    pod = {**env, "WORKER_ID": "template"}
    start(procs, pod, slot=0, tmp_path=tmp_path)
    redis_client.rpush(Q, element("running", sleep=6))
    supabase_standin.wait_for("running", status="processing", timeout=10)
    before = held(redis_client)
    start(procs, pod, slot=0, tmp_path=tmp_path)
    time.sleep(1.0)
    assert held(redis_client) == before
    assert redis_client.llen(Q) == 0
    assert len(supabase_standin.callbacks("running", "processing")) == 1
    supabase_standin.wait_for("running", timeout=15)
    time.sleep(0.5)
    assert len(supabase_standin.callbacks("running", "completed")) == 1


# -- stop order (#2, #17) --------------------------------------------------------------------------------------
def _stop_race_lane(lane: int, queue: str, env: dict, tmp_path: Path, iterations: int, redis_client,
                    failures: list, seed: int) -> None:
    rng = random.Random(seed)
    for n in range(iterations):
        slot = 1000 + 100 * lane + n
        worker = WorkerProcess({**env, "FAKE_QUEUE": queue}, slot=slot, log_path=tmp_path / f"lane{lane}.log")
        try:
            worker.wait_healthy()
            time.sleep(0.2)   # the job loop is now blocked in its move
            job_id = f"race-{lane}-{n}"
            offset = rng.uniform(-0.02, 0.12)   # push a little before or after the SIGTERM
            if offset < 0:
                redis_client.rpush(queue, fake_element(job_id, queue))
                time.sleep(-offset)
                worker.signal(signal.SIGTERM)
            else:
                worker.signal(signal.SIGTERM)
                time.sleep(offset)
                redis_client.rpush(queue, fake_element(job_id, queue))
            code = worker.proc.wait(30)
            left = {k: v for k, v in held(redis_client).items() if re.search(rf"-fake-{slot}(-|$)", k)}
            member = [m for m in redis_client.smembers(keys.ACTIVE_WORKERS) if re.search(rf"-fake-{slot}(-|$)",
                                                                                         m.decode())]
            if code != 0 or left or member:
                failures.append((job_id, f"{offset:+.3f}", code, left, member))
        finally:
            worker.close()


def test_sigterm_while_idle_and_a_job_arriving_in_the_same_instant_loses_nothing(env, redis_client,
                                                                                 supabase_standin, tmp_path):
    """50 stops of an idle worker, each with a job pushed within about 0.1 s of its SIGTERM: when the process
    has exited, it holds nothing and is retired, and every job completes exactly once (the ones it did not take
    are run by a worker started afterwards)."""
    failures: list = []
    lanes = [threading.Thread(target=_stop_race_lane, args=(lane, queue, env, tmp_path, iterations, redis_client,
                                                            failures, 14 + lane))
             for lane, (queue, iterations) in enumerate(zip(FAKE_TYPES, (17, 17, 16)))]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    assert failures == [], failures
    finishers = [WorkerProcess({**env, "FAKE_QUEUE": queue}, slot=900 + i, log_path=tmp_path / "finish.log")
                 for i, queue in enumerate(FAKE_TYPES)]
    try:
        ids = [f"race-{lane}-{n}" for lane, count in enumerate((17, 17, 16)) for n in range(count)]
        wait_until(lambda: all(supabase_standin.callbacks(i, "completed") for i in ids), 60, "every job completed")
        time.sleep(0.5)
        assert all(len(supabase_standin.callbacks(i, "completed")) == 1 for i in ids)
        by_stopping = [
            i for i in ids if "-fake-9" not in supabase_standin.callbacks(i, "completed")[0].body["worker_id"]
        ]
        print(f"{len(by_stopping)} of {len(ids)} jobs were taken and finished by the worker being stopped")
    finally:
        for finisher in finishers:
            finisher.close()


def test_sigterm_stops_taking_jobs_before_the_http_drain(procs, env, redis_client, supabase_standin, tmp_path):
    """An HTTP request still being read keeps gunicorn draining; the job loop must stop at the SIGTERM, not
    after the drain (#17)."""
    worker = start(procs, env, tmp_path=tmp_path)
    slow = socket.create_connection(("127.0.0.1", worker.port))
    try:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")   # headers never finished: the drain waits for it
        time.sleep(0.3)
        worker.signal(signal.SIGTERM)
        time.sleep(1.0)   # well past one poll (QUEUE_POLL_MAX_SECONDS=0.5)
        redis_client.rpush(Q, element("after-sigterm"))
        time.sleep(1.5)
        assert worker.proc.poll() is None, "the drain should still be waiting for the slow request"
        assert redis_client.lrange(Q, 0, -1) == [element("after-sigterm").encode()]
        assert supabase_standin.callbacks("after-sigterm") == []
    finally:
        slow.close()
    assert worker.proc.wait(30) == ExitCode.OK


# -- cold stop against an in-flight settle (#7) ----------------------------------------------------------------
def cold_stop(worker: WorkerProcess, target: str, timeout: float = 20) -> int:
    """SIGINT to the gunicorn master, or to its whole process group as the orchestrator sends it (the worker
    process then gets SIGINT and, from the master, SIGQUIT while it is still handling the first)."""
    if target == "group":
        worker.signal_group(signal.SIGINT)
    else:
        worker.signal(signal.SIGINT)
    return worker.proc.wait(timeout)


@pytest.mark.parametrize("target", ["master", "group"])
def test_cold_stop_while_the_terminal_callback_is_in_flight_sends_it_once(target, procs, env, redis_client,
                                                                          supabase_standin, tmp_path):
    """The app has the `completed` body and holds its 200 for 3 s; the worker gets a cold stop right then. The
    job is not handed back (it would run again), and its one callback is not sent again later."""
    arrived = threading.Event()

    def hold(callback):
        if callback.status == "completed":
            arrived.set()
            time.sleep(3.0)

    supabase_standin.on_callback = hold
    env = {**env, "CALLBACK_TIMEOUT_SECONDS": "10"}
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("settling"))
    assert arrived.wait(15)
    code = cold_stop(worker, target)
    assert code == ExitCode.OK   # nothing was handed back: the job had finished
    assert redis_client.llen(Q) == 0 and held(redis_client) == {}
    assert redis_client.hlen(keys.OUTBOX) == 0   # delivered, so no sender re-sends it
    assert redis_client.exists(keys.done("settling"))
    supabase_standin.on_callback = None
    start(procs, env, slot=1, tmp_path=tmp_path)   # would run a handed-back copy again
    time.sleep(1.5)
    assert len(supabase_standin.callbacks("settling", "completed")) == 1
    assert len(supabase_standin.callbacks("settling", "processing")) == 1


# -- exit codes that reach the orchestrator --------------------------------------------------------------------
def run_worker(env: dict, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "workers", "fake", "--port", str(free_port()), "--handler",
            "tests.fakes.handlers:create_handler", *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_bad_setting_exits_with_config_error(env):
    done = run_worker({**env, "QUEUE_POLL_MAX_SECONDS": "soon"})
    assert done.returncode == ExitCode.CONFIG_ERROR, done.stderr
    assert "QUEUE_POLL_MAX_SECONDS" in done.stderr and "soon" not in done.stderr


@pytest.mark.parametrize("failure, code", [("fatal", ExitCode.BOOT_FAILED), ("config", ExitCode.CONFIG_ERROR)])
def test_a_setup_failure_stops_the_whole_process_with_its_code(env, failure, code):
    done = run_worker({**env, "FAKE_SETUP_ERROR": failure})
    assert done.returncode == code, done.stderr[-2000:]


@pytest.mark.parametrize("target", ["master", "group"])
def test_a_cold_stop_that_hands_a_job_back_exits_with_handed_back(target, procs, env, redis_client, supabase_standin,
                                                                  tmp_path):
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("long", sleep=30))
    supabase_standin.wait_for("long", status="processing", timeout=10)
    assert cold_stop(worker, target) == ExitCode.HANDED_BACK
    assert redis_client.lrange(Q, 0, -1) == [element("long", sleep=30).encode()]


def test_a_warm_stop_whose_grace_runs_out_hands_the_job_back_and_exits_with_handed_back(procs, env, redis_client,
                                                                                        supabase_standin, tmp_path):
    worker = start(procs, {**env, "TEST_GRACE": "1"}, tmp_path=tmp_path)
    redis_client.rpush(Q, element("too-long", sleep=30))
    supabase_standin.wait_for("too-long", status="processing", timeout=10)
    assert worker.stop(signal.SIGTERM, timeout=20) == ExitCode.HANDED_BACK
    assert redis_client.lrange(Q, 0, -1) == [element("too-long", sleep=30).encode()]
    assert int(redis_client.hget(f"{Q}:attempts", "too-long") or 0) == 0


# -- circuit breaker (#5) --------------------------------------------------------------------------------------
def test_a_broken_worker_trips_its_breaker_instead_of_dead_lettering_the_queue(procs, env, redis_client,
                                                                               supabase_standin, tmp_path):
    """One worker whose every job raises a CUDA error, one healthy worker, 30 shared jobs (the default
    WORKER_BREAKER_THRESHOLD 5 and JOB_MAX_ATTEMPTS 3). The broken worker pauses 0.2, 0.4, 0.6, 0.8 s after
    its failures (WORKER_BREAKER_PAUSE_SECONDS 0.2; 1 s by default), so the queue must last longer than those
    2 s for it to meet its fifth job."""
    threshold, attempts = 5, 3
    env = {**env, "WORKER_BREAKER_PAUSE_SECONDS": "0.2"}
    broken = start(procs, {**env, "FAKE_BROKEN": "1"}, slot=1, tmp_path=tmp_path)
    seen: list = []
    watching = threading.Event()

    def watch_health():
        while not watching.is_set() and broken.proc.poll() is None:
            try:
                status, body = health(broken)
                if status == 503:
                    seen.append(body)
            except requests.RequestException:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    ids = [f"shared-{n}" for n in range(30)]
    redis_client.rpush(Q, *[element(i, sleep=0.2) for i in ids])   # the healthy worker needs ~6 s
    start(procs, env, slot=2, tmp_path=tmp_path)
    try:
        assert broken.proc.wait(30) == ExitCode.BREAKER_OPEN
    finally:
        watching.set()
        watcher.join()
    assert any(b.get("state") == "tripped" and "CUDA error" in b.get("error", "") for b in seen), seen[-3:]
    wait_until(lambda: all(supabase_standin.callbacks(i, "completed") or supabase_standin.callbacks(i, "failed")
                           for i in ids), 60, "every job's terminal callback")
    dead = redis_client.llen(f"{Q}:dead")
    # The broken worker failed fewer than `threshold` jobs in a row: at most one of them could have used up
    # all its attempts there; every other job was handed back and completed by the healthy worker.
    assert dead <= (threshold - 1) // attempts, [json.loads(e) for e in redis_client.lrange(f"{Q}:dead:log", 0, -1)]
    assert len(supabase_standin.callbacks(status="completed")) >= 29


def test_a_fatal_worker_error_during_a_job_hands_it_back_and_exits(procs, env, redis_client, supabase_standin,
                                                                   tmp_path):
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("gpu-lost", fatal=True))
    assert worker.proc.wait(20) == ExitCode.FATAL_WORKER_ERROR
    assert redis_client.lrange(Q, 0, -1) == [element("gpu-lost", fatal=True).encode()]
    assert int(redis_client.hget(f"{Q}:attempts", "gpu-lost") or 0) == 0   # not the job's fault: uncounted
    assert supabase_standin.callbacks("gpu-lost", "failed") == []


# -- watchdog (#4, second half) --------------------------------------------------------------------------------
def test_a_wedged_job_past_its_deadline_and_grace_is_handed_back_counted_and_the_worker_exits(
        procs, env, redis_client, supabase_standin, tmp_path):
    env = {**env, "JOB_TIMEOUT_SDXL_SECONDS": "1", "JOB_TIMEOUT_GRACE_SECONDS": "1"}
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("wedged", sleep=60))   # sleeps without calling progress
    supabase_standin.wait_for("wedged", status="processing", timeout=10)
    body = wait_until(lambda: (lambda s, b: b if s == 503 else None)(*health(worker)), 8,
                      "/health 503 after the deadline and the grace")
    assert body["state"] == "tripped" and "job wedged overran its deadline" in body["error"]
    assert worker.proc.wait(10) == ExitCode.WATCHDOG
    assert redis_client.lrange(Q, 0, -1) == [element("wedged", sleep=60).encode()]
    assert int(redis_client.hget(f"{Q}:attempts", "wedged")) == 1   # counted: a job that wedges is not retried forever
    assert supabase_standin.callbacks("wedged", "completed") == []


def test_a_job_delivering_its_callback_past_its_deadline_is_left_alone(procs, env, redis_client, supabase_standin,
                                                                       tmp_path):
    """The deadline bounds the job's run, not its callback delivery: a slow app must not restart the worker."""
    supabase_standin.on_callback = lambda callback: callback.status == "completed" and time.sleep(3.5)
    env = {**env, "JOB_TIMEOUT_SDXL_SECONDS": "1", "JOB_TIMEOUT_GRACE_SECONDS": "1", "CALLBACK_TIMEOUT_SECONDS": "10"}
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("slow-app", sleep=0.5))
    supabase_standin.wait_for("slow-app", timeout=10)
    wait_until(lambda: health(worker)[1]["state"] == "ready", 10, "the delivery finished")
    assert worker.proc.poll() is None
    assert redis_client.hlen(keys.OUTBOX) == 0 and len(supabase_standin.callbacks("slow-app", "completed")) == 1


# -- heartbeat keeps a slow job's claim; /health state ---------------------------------------------------------
def test_the_heartbeat_renews_the_claim_of_a_job_longer_than_its_ttl(procs, env, redis_client, supabase_standin,
                                                                     tmp_path):
    start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("slow", sleep=3 * TTL + 2))
    supabase_standin.wait_for("slow", status="processing", timeout=10)
    time.sleep(3 * TTL + 1)   # past the claim's first TTL
    claim = redis_client.get(keys.claim("slow"))
    assert claim is not None and claim.decode().endswith(":1"), claim
    supabase_standin.wait_for("slow", timeout=15)
    assert len(supabase_standin.callbacks("slow", "completed")) == 1


def test_health_reports_the_state(procs, env, redis_client, supabase_standin, tmp_path):
    worker = start(procs, env, tmp_path=tmp_path)
    time.sleep(0.3)   # the job loop has started
    assert health(worker)[0] == 200 and health(worker)[1]["state"] == "ready"
    redis_client.rpush(Q, element("busy-one", sleep=2))
    supabase_standin.wait_for("busy-one", status="processing", timeout=10)
    assert health(worker)[1]["state"] == "busy"
    supabase_standin.wait_for("busy-one", timeout=10)
    wait_until(lambda: health(worker)[1]["state"] == "ready", 5, "ready again once the job is acknowledged")
    unload = requests.post(f"{worker.url}/memory/unload", headers={"Authorization": "Bearer test-admin-key"})
    assert unload.status_code == 200
    status, body = health(worker)
    assert status == 200 and body["state"] == "unloaded"

"""A real worker process (gunicorn, the fake handler) on real Redis and the Supabase stand-in: its ``/metrics``
has the default process collectors, the job counters and duration histograms by type and outcome, and the queue
depth gauges; its ``/live`` is apart from ``/health``. In process: callback and storage retries are counted."""
from __future__ import annotations

import time
import uuid

import requests

from common import keys
from common.settings import Secret, Settings
from tests.core.worker_procs import element
from tests.procs import WorkerProcess
from workers.core import storage
from workers.core.callbacks import CallbackClient, Outcome, encode
from workers.core.metrics import Metrics
from workers.core.transport import RedisProtocolTransport

from .exposition import families, value

Q = "sdxl_queue"
JOB_TYPE = "sdxl_image_fast"


def start(procs, env, tmp_path, handler="tests.fakes.handlers:create_handler"):
    proc = WorkerProcess(env, handler=handler, log_path=tmp_path / "worker.log")
    procs.append(proc)
    return proc.wait_healthy()


def scrape(url: str) -> str:
    answer = requests.get(url + "/metrics", timeout=5)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return answer.text


def eventually(read, check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = read()
        if check(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_job_queue_and_process_metrics_of_a_worker_process(procs, env, redis_client, supabase_standin, tmp_path):
    worker = start(procs, env, tmp_path)
    done, failed = str(uuid.uuid4()), str(uuid.uuid4())
    redis_client.rpush(Q, element(done), element(failed, fail="INVALID_PROMPT"), b"{not json")
    supabase_standin.wait_for(done, status="completed", timeout=30)
    supabase_standin.wait_for(failed, status="failed", timeout=30)
    text = eventually(lambda: scrape(worker.url),
                      lambda t: value(t, "fleet_queue_jobs", queue=Q, state="dead") == 1
                      and value(t, "worker_jobs_total", outcome="failed") == 1)
    found = families(text)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info",
                 "python_gc_objects_collected"):
        assert name in found, name
    assert value(text, "worker_jobs_total", job_type=JOB_TYPE, outcome="completed") == 1
    assert value(text, "worker_jobs_total", job_type=JOB_TYPE, outcome="failed") == 1
    assert value(text, "worker_jobs_total", job_type="unknown", outcome="dead") == 1
    assert value(text, "worker_job_duration_seconds_count", job_type=JOB_TYPE, outcome="completed") == 1
    assert value(text, "worker_job_duration_seconds_count", job_type=JOB_TYPE, outcome="failed") == 1
    assert value(text, "worker_job_duration_seconds_bucket", job_type=JOB_TYPE, outcome="completed", le="+Inf") == 1
    assert {state: value(text, "fleet_queue_jobs", queue=Q, state=state)
            for state in ("waiting", "processing", "dead")} == {"waiting": 0, "processing": 0, "dead": 1}
    assert value(text, "fleet_callback_outbox_entries") is not None
    assert found["worker_http_requests"].type == "counter"
    for old in ("worker_job_seconds", "worker_queue_depth", "worker_callback_outbox"):
        assert old not in found, f"{old} was renamed"


def test_processing_counts_every_worker_of_the_queue(redis_server, redis_client):
    """``fleet_queue_jobs{state="processing"}``: the processing lists of the workers in ``workers:active``."""
    queue = "wan_queue"   # not the other tests': a killed worker's blocked move may still land on theirs
    redis_client.sadd(keys.ACTIVE_WORKERS, keys.active_member(queue, "w1"), keys.active_member(queue, "w2"),
                      keys.active_member("chat_queue", "w3"))
    redis_client.rpush(keys.processing(queue, "w1"), b"a")
    redis_client.rpush(keys.processing(queue, "w2"), b"b")
    redis_client.rpush(keys.processing("chat_queue", "w3"), b"c")
    redis_client.rpush(queue, b"x", b"y", b"z")
    metrics = Metrics()
    transport = RedisProtocolTransport(redis_server.url, timeout=5)
    try:
        metrics.sample_queue(transport, queue)
    finally:
        transport.close()
    text = metrics.render().decode()
    assert {state: value(text, "fleet_queue_jobs", queue=queue, state=state)
            for state in ("waiting", "processing", "dead")} == {"waiting": 3, "processing": 2, "dead": 0}


def test_live_stays_200_while_health_is_ready_but_the_job_loop_died(procs, env, redis_client, tmp_path):
    worker = start(procs, env, tmp_path, handler="tests.metrics.handlers:create_handler")
    assert requests.get(worker.url + "/live", timeout=5).json()["status"] == "alive"
    redis_client.rpush(Q, element(str(uuid.uuid4()), escape=True))
    live = eventually(lambda: requests.get(worker.url + "/live", timeout=5), lambda r: r.status_code == 503)
    assert live.status_code == 503 and live.json()["status"] == "dead"
    assert "job-loop" in live.json()["error"]
    assert requests.get(worker.url + "/health", timeout=5).status_code == 200   # readiness does not see it


def test_callback_retries_are_counted(supabase_standin):
    metrics = Metrics()
    client = CallbackClient(supabase_standin.url, supabase_standin.service_key, supabase_standin.callback_secret,
                            retry_seconds=30, metrics=metrics, sleep=lambda seconds: None)
    supabase_standin.fail_next(2, 503)
    assert client.deliver(encode("job-r", "w", "completed")) is Outcome.DELIVERED
    text = metrics.render().decode()
    assert value(text, "worker_callback_retries_total", reason="HTTP 503") == 2
    assert value(text, "worker_callback_failures_total", status="503") == 2


def test_storage_retries_are_counted(supabase_standin):
    metrics = Metrics()
    settings = Settings(supabase_url=supabase_standin.url, supabase_service_key=Secret(supabase_standin.service_key))
    store = storage.from_settings(settings, metrics)
    store.sleep = lambda seconds: None
    supabase_standin.fail_storage_next(2, 500)
    assert store.upload("user-1/job-s/0.png", b"png", "image/png") == "user-1/job-s/0.png"
    assert value(metrics.render().decode(), "worker_storage_retries_total", reason="HTTP 500") == 2
    assert supabase_standin.objects["workspace-temp/user-1/job-s/0.png"] == (b"png", "image/png")

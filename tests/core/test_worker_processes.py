"""The runtime in real worker processes (gunicorn + the job loop) on real Redis and a real callback receiver."""
import json
import re
import signal
import time
import uuid

import pytest
import requests

from common import keys
from common.settings import Settings
from tests.core.worker_procs import element, start

Q = "sdxl_queue"


def assert_drained(redis_client, timeout=10.0):
    """Queue, processing lists and outbox all empty (the ack follows the callback by a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
            redis_client.llen(Q) or redis_client.hlen(keys.OUTBOX)
            or any(redis_client.llen(k) for k in redis_client.keys(f"{Q}:processing:*"))):
        time.sleep(0.1)
    assert redis_client.llen(Q) == 0
    assert [k for k in redis_client.keys(f"{Q}:processing:*") if redis_client.llen(k)] == []
    assert redis_client.hlen(keys.OUTBOX) == 0


@pytest.mark.parametrize("transport", ["redis", "upstash"])
def test_a_job_in_each_form_completes_with_assets_in_storage(transport, procs, env, redis_client, upstash_front,
                                                             supabase_standin, tmp_path):
    if transport == "upstash":
        env = {**{k: v for k, v in env.items() if k != "REDIS_URL"},
               "UPSTASH_REDIS_REST_URL": upstash_front.url, "UPSTASH_REDIS_REST_TOKEN": upstash_front.token}
    start(procs, env, tmp_path=tmp_path)
    ids = {form: str(uuid.uuid4()) for form in ("object", "string", "array")}
    for form, job_id in ids.items():
        redis_client.rpush(Q, element(job_id, form, images=2))
    for job_id in ids.values():
        done = supabase_standin.wait_for(job_id, timeout=30).body
        assert [a["url"] for a in done["assets"]] == [f"user-1/{job_id}/0.png", f"user-1/{job_id}/1.png"]
        assert done["assets"][1]["thumbnail_url"] == f"user-1/{job_id}/1.thumb.webp"
        assert done["assets"][0]["metadata"]["file_size_bytes"] > 0
        assert done["metadata"]["job_type"] == "sdxl_image_fast" and done["error_message"] is None
        assert (tmp_path / "storage/workspace-temp/user-1" / job_id / "1.thumb.webp").is_file()
        assert supabase_standin.wait_for(job_id, status="processing", timeout=5)
    assert_drained(redis_client)


def test_bad_fields_get_a_failed_callback_and_garbage_goes_to_dead(procs, env, redis_client, supabase_standin,
                                                                   tmp_path):
    start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, b"{not json", json.dumps({"id": "bad-1", "type": "sdxl_image_fast", "user_id": "u",
                                                    "config": "nope"}),
                       json.dumps({"id": "wrong-q", "type": "video_fast", "user_id": "u"}))
    failed = supabase_standin.wait_for("bad-1", status="failed").body
    assert failed["metadata"]["error_type"] == "INVALID_JOB" and "'config' must be an object" in failed["error_message"]
    assert failed["metadata"]["retryable"] is False and failed["assets"] == []
    assert "belongs to wan_queue" in supabase_standin.wait_for("wrong-q", status="failed").body["error_message"]
    assert redis_client.lrange(f"{Q}:dead", 0, -1) == [b"{not json"]
    assert_drained(redis_client)


def test_sigkill_mid_job_reaper_returns_it_and_another_worker_completes_it_once(procs, env, redis_client,
                                                                                supabase_standin, tmp_path):
    victim = start(procs, env, slot=1, tmp_path=tmp_path)
    redis_client.rpush(Q, element("victim-job", sleep=3))
    supabase_standin.wait_for("victim-job", status="processing", timeout=10)
    victim.signal_group(signal.SIGKILL)  # arbiter and worker, so nothing restarts it
    victim.proc.wait(5)
    assert redis_client.lrange(keys.processing(Q, victim_id(victim, redis_client)), 0, -1) == [
        element("victim-job", sleep=3).encode()]
    start(procs, env, slot=2, tmp_path=tmp_path)
    supabase_standin.wait_for("victim-job", timeout=30)
    time.sleep(1)
    assert len(supabase_standin.callbacks("victim-job", "completed")) == 1
    assert_drained(redis_client)


def victim_id(proc, redis_client):
    holders = [k.decode().split(":processing:")[1] for k in redis_client.keys(f"{Q}:processing:*")
               if redis_client.llen(k)]
    assert len(holders) == 1 and re.fullmatch(r".+-fake-1-[0-9a-f]{6}", holders[0]), holders
    return holders[0]


def test_a_job_that_always_crashes_ends_dead_with_one_failed_callback(procs, env, redis_client, supabase_standin,
                                                                      tmp_path):
    start(procs, env, tmp_path=tmp_path)  # gunicorn respawns the killed process (a new id); the reaper returns the job
    redis_client.rpush(Q, element("poison", crash="exit"), element("after-poison"))
    failed = supabase_standin.wait_for("poison", status="failed", timeout=60).body
    assert failed["metadata"]["error_type"] == "INTERNAL_ERROR"
    supabase_standin.wait_for("after-poison", timeout=30)
    assert len(supabase_standin.callbacks("poison", "failed")) == 1
    assert json.loads(redis_client.lindex(f"{Q}:dead:log", 0))["reason"] == "attempt limit (3) reached"
    assert redis_client.lrange(f"{Q}:dead", 0, -1) == [element("poison", crash="exit").encode()]
    assert_drained(redis_client)


def test_retryable_errors_retry_then_dead_letter(procs, env, redis_client, supabase_standin, tmp_path):
    start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("flaky", retryable=True))
    failed = supabase_standin.wait_for("flaky", status="failed", timeout=30).body
    assert failed["metadata"]["error_type"] == "STORAGE_ERROR"
    # "processing" callbacks go out on a background thread: the last may land just after the terminal one.
    deadline = time.monotonic() + 5
    while len(supabase_standin.callbacks("flaky", "processing")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(supabase_standin.callbacks("flaky", "processing")) == 3
    assert redis_client.llen(f"{Q}:dead") == 1


def test_callback_receiver_down_then_up_the_callback_is_durable_meanwhile_and_arrives_once(
        procs, env, redis_client, supabase_standin, tmp_path):
    start(procs, env, tmp_path=tmp_path)
    supabase_standin.set_down(True)
    redis_client.rpush(Q, element("late-callback"))
    time.sleep(3)
    held = [k for k in redis_client.keys(f"{Q}:processing:*") if redis_client.llen(k)]
    assert held == [] and redis_client.hexists(keys.OUTBOX, "late-callback")  # settled: owed in the outbox
    supabase_standin.set_down(False)
    supabase_standin.wait_for("late-callback", timeout=30)
    assert_drained(redis_client)
    assert len(supabase_standin.callbacks("late-callback", "completed")) == 1


def test_undeliverable_callback_goes_to_outbox_and_arrives_later(procs, env, redis_client, supabase_standin,
                                                                 tmp_path):
    """The worker gives up after 1 s; its own outbox sender (every 0.5 s here, 10 s by default) delivers the
    entry once the receiver is back."""
    env = {**env, "CALLBACK_RETRY_SECONDS": "1", "OUTBOX_INTERVAL_SECONDS": "0.5"}
    start(procs, env, tmp_path=tmp_path)
    supabase_standin.set_down(True)
    redis_client.rpush(Q, element("outboxed"))
    deadline = time.monotonic() + 20
    while not redis_client.hexists(keys.OUTBOX, "outboxed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert redis_client.hexists(keys.OUTBOX, "outboxed")
    assert [k for k in redis_client.keys(f"{Q}:processing:*") if redis_client.llen(k)] == []
    supabase_standin.set_down(False)
    assert supabase_standin.wait_for("outboxed", timeout=30).body["status"] == "completed"
    deadline = time.monotonic() + 10
    while redis_client.hlen(keys.OUTBOX) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_drained(redis_client)


def test_sigterm_is_a_warm_stop_that_finishes_the_job(procs, env, redis_client, supabase_standin, tmp_path):
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("warm", sleep=2), element("next-one"))
    supabase_standin.wait_for("warm", status="processing", timeout=10)
    assert worker.stop(signal.SIGTERM, timeout=30) == 0
    assert supabase_standin.wait_for("warm", timeout=1)
    assert redis_client.lrange(Q, 0, -1) == [element("next-one").encode()]  # not taken after the stop


def test_cold_stop_hands_the_job_back_to_the_head(procs, env, redis_client, supabase_standin, tmp_path):
    worker = start(procs, env, tmp_path=tmp_path)
    redis_client.rpush(Q, element("cold", sleep=30), element("behind"))
    supabase_standin.wait_for("cold", status="processing", timeout=10)
    worker.stop(signal.SIGINT, timeout=20)
    assert redis_client.lrange(Q, 0, -1) == [element("cold", sleep=30).encode(), element("behind").encode()]
    assert supabase_standin.callbacks("cold", "completed") == []
    assert int(redis_client.hget(f"{Q}:attempts", "cold") or 0) == 0


def test_memory_endpoints_need_the_admin_key(procs, env, tmp_path):
    worker = start(procs, env, tmp_path=tmp_path)
    assert requests.post(f"{worker.url}/memory/unload").status_code == 401
    assert requests.post(f"{worker.url}/memory/unload", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = requests.post(f"{worker.url}/memory/unload?which=all", headers={"Authorization": "Bearer test-admin-key"})
    assert ok.status_code == 200 and ok.json()["success"] is True
    status = requests.get(f"{worker.url}/memory/status").json()
    assert status["models"] == {"loaded": False}
    env_report = requests.get(f"{worker.url}/debug/env", headers={"Authorization": "Bearer test-admin-key"}).json()
    assert env_report["settings_set"]["JOB_CALLBACK_SECRET"] is True
    assert set(env_report["settings_set"]) <= set(Settings.env_names())   # declared variables only, by their names
    assert "test-admin-key" not in json.dumps(env_report) and env["JOB_CALLBACK_SECRET"] not in json.dumps(env_report)


def test_burst_of_500_jobs_across_three_processes_all_complete_once(procs, env, redis_client, supabase_standin,
                                                                    tmp_path):
    for slot in range(3):
        start(procs, env, slot=slot, tmp_path=tmp_path)
    ids = [f"burst-{n}" for n in range(500)]
    started = time.monotonic()
    redis_client.rpush(Q, *[element(i) for i in ids])
    deadline = time.monotonic() + 240
    while len(supabase_standin.callbacks(status="completed")) < 500 and time.monotonic() < deadline:
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    completed = [c.job_id for c in supabase_standin.callbacks(status="completed")]
    assert sorted(completed) == sorted(ids)  # all 500, none twice
    workers = {c.body["worker_id"] for c in supabase_standin.callbacks(status="completed")}
    assert len(workers) == 3
    print(f"500 jobs over 3 processes in {elapsed:.1f} s ({500 / elapsed:.0f} jobs/s)")
    assert_drained(redis_client)

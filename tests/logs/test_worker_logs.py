"""A real worker process (gunicorn, the logging fake handler) with ``LOG_FORMAT=json``: every line it prints is
one JSON object, gunicorn's own included; the lines logged while a job runs, on its thread and on a pool thread
it hands work to, carry ``job_id``, ``job_type``, ``worker_id`` and ``attempt``; no secret appears. Without
``LOG_FORMAT`` the lines are the text they always were."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid

from tests.conftest import SUPABASE_TEST_CALLBACK_SECRET, SUPABASE_TEST_SERVICE_KEY
from tests.core.worker_procs import element
from tests.procs import ROOT, WorkerProcess

Q = "sdxl_queue"
HANDLER = "tests.logs.handlers:create_handler"
JOB_FIELDS = ("job_id", "job_type", "worker_id", "attempt")
SECRETS = (SUPABASE_TEST_SERVICE_KEY, SUPABASE_TEST_CALLBACK_SECRET, "test-admin-key")


def run_jobs(procs, env, redis_client, supabase_standin, log_path, *elements_):
    worker = WorkerProcess(env, handler=HANDLER, log_path=log_path)
    procs.append(worker)
    worker.wait_healthy()
    redis_client.rpush(Q, *elements_)
    return worker


def test_json_lines_carry_the_job_fields_and_no_secret(procs, env, redis_client, supabase_standin, tmp_path):
    log_path = tmp_path / "worker.log"
    done, failed = str(uuid.uuid4()), str(uuid.uuid4())
    worker = run_jobs(procs, {**env, "LOG_FORMAT": "json"}, redis_client, supabase_standin, log_path,
                      element(done), element(failed, fail="INVALID_PROMPT"))
    completed = supabase_standin.wait_for(done, status="completed", timeout=30).body
    supabase_standin.wait_for(failed, status="failed", timeout=30)
    assert worker.stop(signal.SIGTERM) == 0
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]   # every line is JSON
    assert all(isinstance(line, dict) and {"time", "level", "logger", "message", "service"} <= line.keys()
               for line in lines)
    assert any(line["logger"].startswith("gunicorn") for line in lines)   # gunicorn's own lines too
    worker_id = completed["worker_id"]
    by_message = {}
    for line in lines:
        by_message.setdefault(line["message"], []).append(line)
    for message in ("fake job: rendering", "fake job: encoding on a pool thread"):
        fields = [{k: line.get(k) for k in JOB_FIELDS} for line in by_message[message]]
        assert {"job_id": done, "job_type": "sdxl_image_fast", "worker_id": worker_id, "attempt": 1} in fields
        assert {f["job_id"] for f in fields} == {done, failed}
    refused = [line for line in lines if line["level"] == "WARNING" and failed in line["message"]]
    assert refused and all(line["job_id"] == failed and line["attempt"] == 1 for line in refused)
    assert "job_id" not in by_message["fake handler built"][0]   # logged before any job
    assert not any(secret in text for secret in SECRETS)


def test_text_stays_the_default_and_unchanged(procs, env, redis_client, supabase_standin, tmp_path):
    log_path = tmp_path / "worker.log"
    job = str(uuid.uuid4())
    worker = run_jobs(procs, env, redis_client, supabase_standin, log_path, element(job))
    supabase_standin.wait_for(job, status="completed", timeout=30)
    worker.stop(signal.SIGTERM)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith("{")]
    own = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[fake\] tests\.logs\.handlers: fake job: rendering"
    assert [line for line in lines if re.fullmatch(own, line)]
    assert [line for line in lines if re.match(r"\[\d{4}-\d\d-\d\d .*\] \[\d+\] \[INFO\] Starting gunicorn", line)]


def test_an_unknown_log_format_is_a_configuration_error(env):
    for command in (["-m", "workers", "fake", "--handler", HANDLER], ["-m", "router"], ["-m", "memory_manager"],
                    ["-m", "registration"], ["-m", "orchestrator"]):
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env={**env, "LOG_FORMAT": "yaml"},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 78, (command, done.stdout, done.stderr)
        assert "LOG_FORMAT" in done.stderr and "yaml" not in done.stderr, command

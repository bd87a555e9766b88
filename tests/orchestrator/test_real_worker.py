"""The orchestrator in front of a real ``python -m workers`` process (gunicorn + job loop + the fake handler
from tests/fakes), on real Redis: a stop during a long job hands the job back to the head of its queue."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import requests

from common.exit_codes import ExitCode

from .support import ROOT, all_running, fleet_env, wait_for


def test_stop_during_a_job_hands_it_back(redis_server, supabase_standin, ports, tmp_path: Path) -> None:
    env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="sdxl", SDXL_MODEL_PATH=str(tmp_path), REDIS_URL=redis_server.url,
                    SUPABASE_URL=supabase_standin.url, SUPABASE_SERVICE_KEY=supabase_standin.service_key,
                    JOB_CALLBACK_SECRET=supabase_standin.callback_secret, STORAGE_DIR=str(tmp_path / "storage"),
                    WORKER_ADMIN_KEY="admin", HOME=str(tmp_path), FLEET_STOP_GRACE_SECONDS="1",
                    FLEET_KILL_AFTER_SECONDS="10", WORKER_STOP_GRACE_SECONDS="300",
                    FLEET_COMMAND_SDXL="{python} -m workers sdxl --port {port} "
                                       "--handler tests.fakes.handlers:create_handler")
    client = redis_server.client()
    client.flushall()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: all_running(env), timeout=30, what="the sdxl worker RUNNING")
        job = json.dumps({"id": "job-1", "type": "sdxl_image_fast", "user_id": "u", "prompt": "x",
                          "config": {"sleep": 60}})
        client.rpush("sdxl_queue", job)
        status = f"http://127.0.0.1:{ports['sdxl']}/status"
        wait_for(lambda: requests.get(status, timeout=5).json().get("busy"), timeout=20, what="the job running")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    # the worker's own grace (300 s) is longer than the orchestrator's (1 s): the cold stop hands the job back
    assert "cold stop (second SIGTERM, SIGINT to the group) for sdxl" in output
    assert "handed job job-1 back to sdxl_queue" in output
    assert proc.returncode == ExitCode.OK, output
    assert [json.loads(e)["id"] for e in client.lrange("sdxl_queue", 0, -1)] == ["job-1"]


def test_a_worker_with_a_bad_setting_is_fatal_at_once(ports, tmp_path: Path) -> None:
    """Only the worker sees the bad value (``env`` sets it for the child): the orchestrator itself starts."""
    env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="sdxl", SDXL_MODEL_PATH=str(tmp_path), HOME=str(tmp_path),
                    FLEET_BACKOFF_BASE_SECONDS="0.05", FLEET_BACKOFF_MAX_SECONDS="0.1",
                    FLEET_COMMAND_SDXL="env JOB_MAX_ATTEMPTS=many {python} -m workers sdxl --port {port} "
                                       "--handler tests.fakes.handlers:create_handler")
    result = subprocess.run([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert "JOB_MAX_ATTEMPTS" in output  # the worker's one-line reason, through the orchestrator's log
    assert "sdxl: STARTING -> FATAL (exited with status 78 (CONFIG_ERROR)" in output, output
    assert output.count("sdxl: EXITED -> STARTING") == 1
    assert result.returncode == ExitCode.ALL_FATAL

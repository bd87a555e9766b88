"""startup.sh: names what is missing, never echoes a secret, prepares directories, execs the orchestrator."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from common.exit_codes import ExitCode

from .support import ROOT, all_running, fake_command, fleet_env, read_events, wait_for

SCRIPT = ROOT / "startup.sh"
SECRETS = {"SUPABASE_SERVICE_KEY": "s3cret-service-key", "JOB_CALLBACK_SECRET": "s3cret-callback",
           "WORKER_ADMIN_KEY": "s3cret-admin", "UPSTASH_REDIS_REST_TOKEN": "s3cret-token"}


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "HOME": str(tmp_path),
            "FLEET_BASE_DIR": str(tmp_path / "base"), **extra}


def full_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = {"SUPABASE_URL": "https://example.supabase.co", **SECRETS,
                "UPSTASH_REDIS_REST_URL": "https://example.upstash.io", "SDXL_MODEL_PATH": str(tmp_path),
                "WAN_MODEL_PATH": str(tmp_path / "missing-wan")}
    return base_env(tmp_path, **{**settings, **extra})


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_missing_settings_are_named(tmp_path: Path) -> None:
    result = run(base_env(tmp_path, UPSTASH_REDIS_REST_URL="https://x.upstash.io"), "--check")
    assert result.returncode == 1
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_KEY (or SUPABASE_SERVICE_ROLE_KEY)", "JOB_CALLBACK_SECRET",
                 "REDIS_URL (or UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN)", "WORKER_ADMIN_KEY",
                 "a model path"):
        assert f"  - {name}" in result.stderr
    assert not (tmp_path / "base").exists()  # nothing prepared before the check passes


def test_check_passes_prepares_directories_and_never_prints_a_secret(tmp_path: Path) -> None:
    result = run(full_env(tmp_path, SUPABASE_SERVICE_KEY="", SUPABASE_SERVICE_ROLE_KEY="s3cret-role"), "--check")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for sub in ("hf", "tmp", "logs"):
        assert (tmp_path / "base" / sub).is_dir()
    assert "WAN_MODEL_PATH is set but does not exist" in output
    assert "chat: QWEN_INSTRUCT_PATH or QWEN_BASE_PATH not set" in output
    assert "HF_HUB_OFFLINE=1" in output and "check passed" in output
    assert not any(value in output for value in [*SECRETS.values(), "s3cret-role"])


def test_execs_the_orchestrator(tmp_path: Path, ports: dict[str, int]) -> None:
    events = tmp_path / "events.jsonl"
    env = {**fleet_env(ports, tmp_path), **full_env(tmp_path), "FLEET_PROGRAMS": "memory_manager",
           "FLEET_COMMAND_MEMORY_MANAGER": " ".join(fake_command("memory_manager", events))}
    del env["LOG_DIR"]
    proc = subprocess.Popen([str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: all_running(env), timeout=20, what="the fleet RUNNING")
        child_env = read_events(events)[0]["env"]
        assert child_env["FLEET_PROGRAM"] == "memory_manager"
    finally:
        proc.send_signal(signal.SIGTERM)  # startup.sh exec'd: this pid is the orchestrator now
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.OK, output
    assert "memory_manager: STARTING -> RUNNING" in output
    assert (tmp_path / "base" / "logs" / "orchestrator.log").exists()
    assert not any(value in output for value in SECRETS.values())


def test_runs_under_tini_when_it_is_installed(tmp_path: Path, ports: dict[str, int]) -> None:
    """tini (when present) is the reaper of last resort; without it the orchestrator reaps orphans itself."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "tini-args"
    tini = bin_dir / "tini"  # a stand-in: records its arguments, then execs what follows "--" as tini does
    tini.write_text(f'#!/bin/sh\necho "$@" > {record}\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    tini.chmod(0o755)
    events = tmp_path / "events.jsonl"
    env = {**fleet_env(ports, tmp_path), **full_env(tmp_path), "FLEET_PROGRAMS": "memory_manager",
           "FLEET_COMMAND_MEMORY_MANAGER": " ".join(fake_command("memory_manager", events)),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: all_running(env), timeout=20, what="the fleet RUNNING under tini")
    finally:
        proc.send_signal(signal.SIGTERM)  # to tini's pid (here the stand-in exec'd: the orchestrator)
        output, _ = proc.communicate(timeout=30)
    assert record.read_text().split() == ["-s", "--", sys.executable, "-m", "orchestrator"]
    assert f"exec tini -s -- {sys.executable} -m orchestrator" in output
    assert proc.returncode == ExitCode.OK, output

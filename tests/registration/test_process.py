"""``python -m registration`` as a process, alone and under the orchestrator: startup registration, heartbeat,
``restart`` after a health outage, its own /health, SIGTERM, the idle mode, --help and bad settings."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from common.exit_codes import ExitCode
from local.net import free_port
from tests.conftest import SUPABASE_TEST_SERVICE_KEY as KEY
from tests.orchestrator.support import ROOT, all_running, fake_command, fleet_env, status, wait_for

from .support import methods


def registration_env(services, **extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "CHAT_PORT": str(services["chat"].port),
                "ROUTER_PORT": str(services["router"].port), "REGISTRATION_HEALTH_POLL_SECONDS": "0.1", **extra})
    return env


@pytest.fixture
def launch():
    procs: list[subprocess.Popen] = []

    def run(env: dict[str, str], *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "registration", *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def health(port: int) -> dict | None:
    try:
        answer = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except requests.RequestException:
        return None
    return answer.json() if answer.status_code == 200 else None


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, then its whole output; SIGKILL (and the output so far) if it does not exit within 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=10)
        output += "\n(killed: no exit within 30 s of SIGTERM)"
    return output


def test_registers_heartbeats_and_reregisters_after_an_outage(launch, supabase_standin, services) -> None:
    port = free_port()
    env = registration_env(services, SUPABASE_URL=supabase_standin.url, SUPABASE_SERVICE_KEY=KEY,
                           PUBLIC_BASE_URL="http://127.0.0.1:{port}", REGISTRATION_INTERVAL_SECONDS="0.5")
    proc = launch(env, "--port", str(port))
    first = wait_for(lambda: health(port), timeout=30, what="registration's /health")
    assert first["registering"] is True and first["services"]["chat"]["registrations"] == 0
    time.sleep(0.5)
    assert supabase_standin.registrations == []  # neither service answers /health yet
    services["chat"].ready = services["router"].ready = True
    wait_for(lambda: len(methods(supabase_standin)) >= 3, what="startup registration and two heartbeats")
    assert methods(supabase_standin)[:3] == ["startup", "heartbeat", "heartbeat"]
    chat = [r for r in supabase_standin.registrations if r.function == "register-chat-worker"]
    assert chat[0].accepted and chat[0].body == {"worker_url": services["chat"].url, "auto_registered": True}

    services["router"].ready = False  # the router restarts: its /health goes away, then comes back
    time.sleep(0.4)
    services["router"].ready = True
    wait_for(lambda: "restart" in methods(supabase_standin), what="a restart registration after the outage")
    assert health(port)["services"]["router"]["registrations"] >= 4

    output = stop(proc)
    assert proc.returncode == 0, output
    count = len(supabase_standin.registrations)
    time.sleep(0.8)
    assert len(supabase_standin.registrations) == count  # the heartbeat ended with the process
    assert "router: update-worker-url: registered" in output and "(restart)" in output
    assert KEY not in output


def test_idle_and_healthy_when_registration_is_off(launch, supabase_standin, services) -> None:
    services["chat"].ready = services["router"].ready = True
    port = free_port()
    proc = launch(registration_env(services, SUPABASE_URL=supabase_standin.url, SUPABASE_SERVICE_KEY=KEY),
                  "--port", str(port))
    document = wait_for(lambda: health(port), timeout=30, what="registration's /health")
    assert document["registering"] is False and "PUBLIC_BASE_URL" in document["reason"]
    time.sleep(0.5)
    output = stop(proc)
    assert supabase_standin.registrations == []
    assert output.count("registration off: neither PUBLIC_BASE_URL nor RUNPOD_POD_ID is set") == 1


def test_help_has_no_side_effects(services, tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "registration", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env=registration_env(services, REGISTRATION_PORT=str(port)))
    assert result.returncode == 0 and "REGISTRATION_PORT" in result.stdout and result.stderr == ""
    assert health(port) is None


@pytest.mark.parametrize("variable, value", [("REGISTRATION_INTERVAL_SECONDS", "-1"),
                                             ("REGISTRATION_HEALTH_POLL_SECONDS", "soon"),
                                             ("CHAT_PORT", "70000")])
def test_bad_settings_exit_with_config_error(services, variable: str, value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "registration"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30, env=registration_env(services, **{variable: value}))
    assert result.returncode == ExitCode.CONFIG_ERROR and variable in result.stderr and value not in result.stderr


def test_the_orchestrator_runs_it_as_a_program(supabase_standin, ports, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="registration,chat", QWEN_INSTRUCT_PATH=str(tmp_path),
                    FLEET_COMMAND_CHAT=" ".join(fake_command("chat", events, "--ready-after", "0.5")),
                    SUPABASE_URL=supabase_standin.url, SUPABASE_SERVICE_KEY=KEY,
                    PUBLIC_BASE_URL="http://127.0.0.1:{port}", FLEET_STOP_GRACE_SECONDS="5",
                    REGISTRATION_HEALTH_POLL_SECONDS="0.2")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    failure = None
    try:
        document = wait_for(lambda: all_running(env), timeout=30, what="registration and chat RUNNING")
        assert [p["name"] for p in document["programs"]] == ["registration", "chat"]
        assert "registration" in status(env).stdout
        wait_for(lambda: supabase_standin.registrations, timeout=20, what="chat registered")
    except AssertionError as exc:
        failure = exc
    output = stop(proc)
    assert failure is None and proc.returncode == ExitCode.OK, f"{failure}\n{output}"
    (reg,) = supabase_standin.registrations
    assert reg.function == "register-chat-worker" and reg.accepted
    assert reg.body == {"worker_url": f"http://127.0.0.1:{ports['chat']}", "auto_registered": True}
    assert "registration | INFO registration: chat: register-chat-worker: registered" in output
    assert KEY not in output

"""``python -m orchestrator`` as a process: health-gated start, status, SIGTERM and SIGKILL of the orchestrator."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from common.exit_codes import ExitCode

from .support import ROOT, alive, all_running, fake_command, fleet_env, read_events, status, wait_for


def fake_fleet_env(ports: dict[str, int], tmp_path: Path, events: Path, **extra: str) -> dict[str, str]:
    commands = {f"FLEET_COMMAND_{name.upper()}": " ".join(fake_command(name, events, "--ready-after", "0.2"))
                for name in ("memory_manager", "router", "sdxl", "chat")}
    settings = {"FLEET_PROGRAMS": "memory_manager,router,sdxl,chat", "SDXL_MODEL_PATH": str(tmp_path),
                "QWEN_INSTRUCT_PATH": str(tmp_path), "FLEET_STOP_GRACE_SECONDS": "5",
                "FLEET_KILL_AFTER_SECONDS": "1", **commands}
    return fleet_env(ports, tmp_path, **{**settings, **extra})


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def orchestrator():
    procs: list[subprocess.Popen] = []

    def run(env: dict[str, str], *args: str) -> subprocess.Popen:
        proc = start(env, *args)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_stops_every_child_and_leaves_nothing(orchestrator, ports, tmp_path: Path, events: Path) -> None:
    env = fake_fleet_env(ports, tmp_path, events)
    proc = orchestrator(env)
    document = wait_for(lambda: all_running(env), timeout=20, what="every program RUNNING")
    assert [p["name"] for p in document["programs"]] == ["memory_manager", "router", "sdxl", "chat"]
    table = status(env).stdout
    assert "PROGRAM" in table and "RUNNING" in table and str(ports["chat"]) in table
    started = [e["name"] for e in read_events(events) if e["event"] == "started"]
    assert started == ["memory_manager", "router", "sdxl", "chat"]
    sdxl_env = next(e["env"] for e in read_events(events) if e["event"] == "started" and e["name"] == "sdxl")
    assert sdxl_env["FLEET_PROGRAM"] == "sdxl" and sdxl_env["FLEET_GPU_INDEX"] == "0"
    assert sdxl_env["MEMORY_MANAGER_URL"] == f"http://127.0.0.1:{ports['memory_manager']}"
    pids = [p["pid"] for p in document["programs"]]

    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.OK
    assert not any(alive(pid) for pid in pids)
    log = read_events(events)
    assert {e["name"] for e in log if e["event"] == "sigterm"} == {"memory_manager", "router", "sdxl", "chat"}
    assert {e["name"] for e in log if e["event"] == "exiting"} == {"memory_manager", "router", "sdxl", "chat"}
    # one line per event, with the program's name; children's output prefixed; the same in the log file
    assert "sdxl: STARTING -> RUNNING" in output and "chat | chat starting on port" in output
    assert "wan skipped" not in output  # not in FLEET_PROGRAMS: not mentioned
    logged = (tmp_path / "logs" / "orchestrator.log").read_text()
    assert "router: RUNNING -> STOPPING" in logged and "orchestrator exits with 0 (OK)" in logged
    assert status(env).returncode == ExitCode.STATUS_UNAVAILABLE


def test_sigkill_of_the_orchestrator_takes_the_children_down(orchestrator, ports, tmp_path: Path,
                                                             events: Path) -> None:
    env = fake_fleet_env(ports, tmp_path, events)
    proc = orchestrator(env)
    document = wait_for(lambda: all_running(env), timeout=20, what="every program RUNNING")
    pids = [p["pid"] for p in document["programs"]]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10, what="children gone (PDEATHSIG)")
    assert {e["name"] for e in read_events(events) if e["event"] == "sigterm"} == {
        "memory_manager", "router", "sdxl", "chat"}


def test_model_worker_without_model_path_is_skipped(orchestrator, ports, tmp_path: Path, events: Path) -> None:
    env = fake_fleet_env(ports, tmp_path, events, FLEET_PROGRAMS="memory_manager,sdxl,chat")
    del env["QWEN_INSTRUCT_PATH"]
    proc = orchestrator(env)
    wait_for(lambda: all_running(env), timeout=20, what="every program RUNNING")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert "chat skipped: QWEN_INSTRUCT_PATH / QWEN_BASE_PATH is not set" in output
    assert [e["name"] for e in read_events(events) if e["event"] == "started"] == ["memory_manager", "sdxl"]
    assert proc.returncode == ExitCode.OK


@pytest.mark.parametrize("variable, value", [("FLEET_PROGRAMS", "sdxl,bogus"), ("GPU_PLACEMENT", "sdxl:x"),
                                             ("SDXL_PORT", "99999")])
def test_bad_settings_exit_with_config_error(ports, tmp_path: Path, variable: str, value: str) -> None:
    env = fleet_env(ports, tmp_path, **{variable: value})
    result = subprocess.run([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == ExitCode.CONFIG_ERROR and variable in result.stderr


def test_real_memory_manager_and_router_under_the_orchestrator(orchestrator, ports, tmp_path: Path,
                                                              events: Path) -> None:
    env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="memory_manager,router,sdxl", SDXL_MODEL_PATH=str(tmp_path),
                    FLEET_COMMAND_SDXL=" ".join(fake_command("sdxl", events)), MEMORY_PROBE="capacity",
                    WORKER_ADMIN_KEY="k", FLEET_STOP_GRACE_SECONDS="10", HOME=str(tmp_path))
    proc = orchestrator(env)
    wait_for(lambda: all_running(env), timeout=30, what="every program RUNNING")
    router = f"http://127.0.0.1:{ports['router']}"
    health = requests.get(f"{router}/health", timeout=10)
    assert health.status_code == 200 and health.json()["workers"]["sdxl"]["status"] == "healthy"
    assert requests.get(f"{router}/sdxl/health", timeout=10).json()["name"] == "sdxl"  # through to the fake
    memory = requests.get(f"http://127.0.0.1:{ports['memory_manager']}/memory/status", timeout=10).json()
    assert memory["probe"] == "capacity"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.OK, output
    assert "router: STOPPING -> EXITED (exited with status 0)" in output
    assert "memory_manager: STOPPING -> EXITED (exited with status 0)" in output


def test_status_names_exit_codes_and_a_config_error_is_fatal_at_once(orchestrator, ports, tmp_path: Path,
                                                                     events: Path) -> None:
    env = fake_fleet_env(ports, tmp_path, events, FLEET_PROGRAMS="memory_manager,sdxl,chat",
                         FLEET_COMMAND_SDXL='{python} -c "import sys; sys.exit(78)"',
                         FLEET_COMMAND_CHAT='{python} -c "import sys; sys.exit(76)"',
                         FLEET_BACKOFF_BASE_SECONDS="30", FLEET_BACKOFF_MAX_SECONDS="30")
    proc = orchestrator(env)

    def settled() -> dict | None:
        result = status(env, "--json")
        if result.returncode != 0:
            return None
        states = {p["name"]: p for p in json.loads(result.stdout)["programs"]}
        return states if (states["sdxl"]["state"], states["chat"]["state"]) == ("FATAL", "BACKOFF") else None

    states = wait_for(settled, timeout=20, what="sdxl FATAL, chat in BACKOFF")
    assert states["sdxl"]["last_exit_name"] == "CONFIG_ERROR" and states["chat"]["last_exit_name"] == "BREAKER_OPEN"
    table = status(env).stdout
    assert "78 CONFIG_ERROR" in table and "76 BREAKER_OPEN" in table
    assert "sdxl: exited with status 78 (CONFIG_ERROR): restarting cannot help, not restarting" in table
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert output.count("sdxl: EXITED -> STARTING") == 1  # one spawn, not five model loads
    assert "chat: STARTING -> BACKOFF (exited with status 76 (BREAKER_OPEN); restart in 30.0 s)" in output
    assert proc.returncode == ExitCode.OK

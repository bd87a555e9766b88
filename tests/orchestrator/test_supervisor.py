"""The supervisor with real child processes (tests/orchestrator/fake_program.py) on loopback ports."""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from common.exit_codes import ExitCode
from local.net import free_port
from orchestrator.program import Backoff, ProgramSpec, ProgramState
from orchestrator.supervisor import Supervisor

from .support import alive, fake_command, read_events, wait_for

FAST = Backoff(base_seconds=0.05, max_seconds=0.2, max_quick_failures=3, stable_seconds=30)


def spec(name: str, events: Path, *flags: str, start_timeout: float = 10.0, stop_wave: int = 0) -> ProgramSpec:
    port = free_port()
    return ProgramSpec(name, fake_command(name, events, *flags, port=port), port, start_timeout=start_timeout,
                       stop_wave=stop_wave)


class Running:
    """A supervisor run on its own thread (the thread that spawns the children, as in production)."""

    def __init__(self, specs: list[ProgramSpec], **kwargs) -> None:
        options = dict(stop_grace=5.0, kill_after=1.0, health_interval=0.2)
        options.update(kwargs)
        self.supervisor = Supervisor(specs, FAST, **options)
        self.code: ExitCode | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.supervisor.run()

    def program(self, name: str):
        return next(p for p in self.supervisor.programs if p.name == name)

    def state(self, name: str) -> ProgramState:
        return self.program(name).state

    def stop(self, timeout: float = 20.0) -> ExitCode | None:
        self.supervisor.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.code


@pytest.fixture
def running():
    runs: list[Running] = []

    def start(specs: list[ProgramSpec], **kwargs) -> Running:
        run = Running(specs, **kwargs)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.thread.is_alive():
            run.stop()


def test_start_order_waits_for_each_health(running, events: Path) -> None:
    run = running([spec("memory_manager", events, "--ready-after", "0.4"),
                   spec("router", events, "--ready-after", "0.3"),
                   spec("sdxl", events, "--ready-after", "0.3")])
    wait_for(lambda: all(run.state(n) is ProgramState.RUNNING for n in ("memory_manager", "router", "sdxl")),
             what="all RUNNING")
    log = read_events(events)
    started = {e["name"]: e["t"] for e in log if e["event"] == "started"}
    ready = {e["name"]: e["t"] for e in log if e["event"] == "ready"}
    assert started["memory_manager"] < ready["memory_manager"] < started["router"] < ready["router"] \
        < started["sdxl"]
    assert run.stop() is ExitCode.OK


def test_start_timeout_leads_to_backoff_and_the_next_program_still_starts(running, events: Path) -> None:
    run = running([spec("memory_manager", events, "--ready-after", "999", start_timeout=0.5),
                   spec("router", events)])
    wait_for(lambda: run.state("router") is ProgramState.RUNNING, what="router RUNNING")
    program = run.program("memory_manager")
    wait_for(lambda: program.restarts >= 1, what="a restart after the start timeout")
    assert "no /health 200 within 0.5 s" in program.reason or program.state is ProgramState.STARTING
    run.stop()


def test_sigkilled_child_is_restarted(running, events: Path) -> None:
    run = running([spec("sdxl", events), spec("chat", events)])
    wait_for(lambda: run.state("chat") is ProgramState.RUNNING, what="chat RUNNING")
    sdxl = run.program("sdxl")
    first_pid = sdxl.pid
    chat_pid = run.program("chat").pid
    import os
    os.kill(first_pid, signal.SIGKILL)
    wait_for(lambda: sdxl.restarts == 1 and sdxl.state is ProgramState.RUNNING, what="sdxl restarted")
    assert sdxl.pid != first_pid and sdxl.last_exit == -signal.SIGKILL
    assert requests.get(sdxl.spec.health_url, timeout=2).status_code == 200
    assert run.program("chat").pid == chat_pid and run.program("chat").restarts == 0
    assert run.stop() is ExitCode.OK


def test_program_exiting_at_once_ends_fatal_while_others_keep_serving(running, events: Path) -> None:
    run = running([spec("sdxl", events), spec("chat", events, "--exit-at-once", "2"), spec("wan", events)])
    chat = run.program("chat")
    wait_for(lambda: chat.state is ProgramState.FATAL, what="chat FATAL")
    assert chat.spawns == 3 and chat.last_exit == 2 and "3 quick failures" in chat.reason
    wait_for(lambda: run.state("wan") is ProgramState.RUNNING, what="wan RUNNING")
    for name in ("sdxl", "wan"):
        assert run.state(name) is ProgramState.RUNNING
        assert requests.get(run.program(name).spec.health_url, timeout=2).status_code == 200
    status = {p["name"]: p for p in run.supervisor.status()["programs"]}
    assert status["chat"]["state"] == "FATAL" and status["chat"]["pid"] is None
    time.sleep(0.5)
    assert chat.spawns == 3  # never restarted again
    assert run.stop() is ExitCode.OK


def test_all_fatal_ends_the_run(running, events: Path) -> None:
    run = running([spec("sdxl", events, "--exit-at-once", "1")])
    run.thread.join(10)
    assert run.code is ExitCode.ALL_FATAL


def test_unexecutable_command_is_fatal(running) -> None:
    port = free_port()
    run = running([ProgramSpec("sdxl", ("/nonexistent/program",), port)])
    run.thread.join(10)
    assert run.code is ExitCode.ALL_FATAL and "cannot execute" in run.program("sdxl").reason


def test_stop_goes_wave_by_wave_in_reverse_order_and_kills_what_ignores_sigterm(running, events: Path) -> None:
    run = running([spec("memory_manager", events, stop_wave=2), spec("router", events, stop_wave=1),
                   spec("sdxl", events, "--child"), spec("chat", events, "--ignore-term"),
                   spec("wan", events, "--warm-seconds", "30")], stop_grace=1.0, kill_after=0.5)
    wait_for(lambda: run.state("wan") is ProgramState.RUNNING, what="wan RUNNING")
    pids = {p.name: p.pid for p in run.supervisor.programs}
    began = time.monotonic()
    assert run.stop() is ExitCode.KILLED_CHILDREN
    took = time.monotonic() - began
    log = read_events(events)
    terms = [(e["name"], e["t"]) for e in log if e["event"] == "sigterm"]
    names = [name for name, _ in terms]
    assert sorted(names[:3]) == ["chat", "sdxl", "wan"]      # wave 0: the model workers, together
    assert sorted(names[3:5]) == ["chat", "wan"]              # the cold stop after the grace period
    assert names[5:] == ["router", "memory_manager"]          # then waves 1 and 2
    assert [e["name"] for e in log if e["event"] == "sigint"] in (["wan", "chat"], ["chat", "wan"])
    assert {e["name"] for e in log if e["event"] == "cold"} == {"wan"}  # wan hands its job back and exits
    assert {e["name"] for e in log if e["event"] == "exiting"} == {"sdxl", "wan", "router", "memory_manager"}
    exited = {e["name"]: e["t"] for e in log if e["event"] == "exiting"}
    router_term = dict((n, t) for n, t in terms if n == "router")["router"]
    assert exited["wan"] < router_term                        # the router outlives the workers' drain
    assert run.program("wan").last_exit == 0
    assert 1.5 <= took < 5
    grandchild = next(e["grandchild"] for e in log if e["event"] == "grandchild")
    assert not any(alive(pid) for pid in [*pids.values(), grandchild])
    assert all(p.state is ProgramState.EXITED for p in run.supervisor.programs)
    assert run.program("chat").last_exit == -signal.SIGKILL


def test_second_stop_request_skips_the_grace_period(running, events: Path) -> None:
    run = running([spec("sdxl", events, "--ignore-term")], stop_grace=30.0, kill_after=0.3)
    wait_for(lambda: run.state("sdxl") is ProgramState.RUNNING, what="sdxl RUNNING")
    run.supervisor.request_stop()
    time.sleep(0.3)
    began = time.monotonic()
    run.supervisor.request_stop()
    run.thread.join(10)
    assert run.code is ExitCode.KILLED_CHILDREN and time.monotonic() - began < 5


def test_unhealthy_running_program_is_restarted_and_the_others_keep_running(running, events: Path,
                                                                             tmp_path: Path) -> None:
    marker = tmp_path / "sdxl-sick"
    # 503 "loading" for 0.6 s while STARTING (probed every 0.25 s): never counts toward the restart
    run = running([spec("sdxl", events, "--ready-after", "0.6", "--unhealthy-when", str(marker)),
                   spec("chat", events)], health_interval=0.05, unhealthy_restart_checks=3)
    wait_for(lambda: run.state("chat") is ProgramState.RUNNING, what="chat RUNNING")
    sdxl, chat = run.program("sdxl"), run.program("chat")
    time.sleep(0.3)  # a few healthy RUNNING checks
    assert (sdxl.restarts, sdxl.failed_checks, sdxl.state) == (0, 0, ProgramState.RUNNING)
    first_pid, chat_pid = sdxl.pid, chat.pid
    marker.touch()
    wait_for(lambda: sdxl.restarts == 1 and sdxl.state is ProgramState.RUNNING, what="sdxl restarted")
    assert sdxl.pid != first_pid and not alive(first_pid)
    assert sdxl.last_exit == 0 and sdxl.quick_failures == 1  # a warm stop; a short run counts as quick
    assert requests.get(sdxl.spec.health_url, timeout=2).status_code == 200
    log = [(e["name"], e["event"], e["pid"]) for e in read_events(events)]
    assert ("sdxl", "unhealthy", first_pid) in log and ("sdxl", "sigterm", first_pid) in log
    assert ("sdxl", "exiting", first_pid) in log and ("sdxl", "sigint", first_pid) not in log
    assert (chat.pid, chat.restarts, chat.state) == (chat_pid, 0, ProgramState.RUNNING)
    assert run.stop() is ExitCode.OK


def test_hung_program_that_ignores_sigterm_is_cold_stopped_then_killed_and_restarted(running, events: Path,
                                                                                      tmp_path: Path) -> None:
    marker = tmp_path / "chat-hung"
    run = running([spec("chat", events, "--ignore-term", "--unhealthy-when", str(marker),
                        "--unhealthy-mode", "hang")],
                  health_interval=0.05, unhealthy_restart_checks=1, stop_grace=0.3, kill_after=0.3)
    chat = run.program("chat")
    wait_for(lambda: chat.state is ProgramState.RUNNING, what="chat RUNNING")
    first_pid = chat.pid
    marker.touch()
    wait_for(lambda: chat.state is ProgramState.STOPPING, timeout=5, what="chat STOPPING")
    assert chat.health == "no answer" and "unhealthy: 1 failed /live checks" in chat.reason
    wait_for(lambda: chat.restarts == 1 and chat.state is ProgramState.RUNNING, what="chat restarted")
    assert chat.last_exit == -signal.SIGKILL and not alive(first_pid)
    events_of_first = [e["event"] for e in read_events(events) if e["pid"] == first_pid]
    assert events_of_first.count("sigterm") == 2 and "sigint" in events_of_first  # warm, then cold stop
    run.stop()


def test_shutdown_during_a_health_restart_ends_it_exited(running, events: Path, tmp_path: Path) -> None:
    marker = tmp_path / "wan-sick"
    run = running([spec("wan", events, "--warm-seconds", "0.5", "--unhealthy-when", str(marker))],
                  health_interval=0.05, unhealthy_restart_checks=2)
    wan = run.program("wan")
    wait_for(lambda: wan.state is ProgramState.RUNNING, what="wan RUNNING")
    marker.touch()
    wait_for(lambda: wan.state is ProgramState.STOPPING, what="wan STOPPING")
    assert run.stop() is ExitCode.OK
    assert wan.state is ProgramState.EXITED and wan.restarts == 0 and wan.last_exit == 0


def test_unhealthy_restart_disabled_with_zero(running, events: Path, tmp_path: Path) -> None:
    marker = tmp_path / "sdxl-sick"
    run = running([spec("sdxl", events, "--unhealthy-when", str(marker))],
                  health_interval=0.05, unhealthy_restart_checks=0)
    sdxl = run.program("sdxl")
    wait_for(lambda: sdxl.state is ProgramState.RUNNING, what="sdxl RUNNING")
    first_pid = sdxl.pid
    marker.touch()
    wait_for(lambda: sdxl.failed_checks >= 20, what="20 failed checks")
    assert (sdxl.pid, sdxl.restarts, sdxl.state) == (first_pid, 0, ProgramState.RUNNING)
    assert sdxl.health == "unavailable (503)" and run.supervisor.status()["programs"][0]["failed_checks"] >= 20
    assert run.stop() is ExitCode.OK


def test_a_running_program_that_is_alive_but_not_ready_is_not_restarted(running, events: Path,
                                                                        tmp_path: Path) -> None:
    """Liveness apart from readiness: /health 503 (busy reloading, say) with /live 200 is shown, never restarted."""
    marker = tmp_path / "sdxl-not-ready"
    run = running([spec("sdxl", events, "--unhealthy-when", str(marker), "--unhealthy-mode", "not-ready")],
                  health_interval=0.05, unhealthy_restart_checks=2)
    sdxl = run.program("sdxl")
    wait_for(lambda: sdxl.state is ProgramState.RUNNING, what="sdxl RUNNING")
    first_pid = sdxl.pid
    marker.touch()
    wait_for(lambda: sdxl.health == "unavailable (503)", what="sdxl not ready")
    time.sleep(0.5)  # ten checks: five times the restart limit
    status = run.supervisor.status()["programs"][0]
    assert (sdxl.pid, sdxl.restarts, sdxl.state) == (first_pid, 0, ProgramState.RUNNING)
    assert (status["health"], status["live"], status["failed_checks"]) == ("unavailable (503)", "ok", 0)
    assert run.stop() is ExitCode.OK


def exiting(name: str, code: int) -> ProgramSpec:
    """A stand-in child that exits at once with ``code`` (as a worker does with its named exit codes)."""
    return ProgramSpec(name, (sys.executable, "-c", f"import sys; sys.exit({code})"), free_port())


@pytest.mark.parametrize("code", [ExitCode.CONFIG_ERROR, ExitCode.BOOT_FAILED, ExitCode.APP_LOAD_FAILED])
def test_a_futile_exit_code_is_fatal_at_once(running, events: Path, code: ExitCode) -> None:
    run = running([exiting("sdxl", code), spec("chat", events)])
    sdxl = run.program("sdxl")
    wait_for(lambda: sdxl.state is ProgramState.FATAL, what="sdxl FATAL")
    assert sdxl.spawns == 1 and sdxl.last_exit == code
    assert f"exited with status {int(code)} ({code.name})" in sdxl.reason and "not restarting" in sdxl.reason
    wait_for(lambda: run.state("chat") is ProgramState.RUNNING, what="chat RUNNING")  # the others still start
    time.sleep(0.4)  # several backoff periods (FAST: at most 0.2 s): still one spawn
    assert sdxl.spawns == 1
    assert run.supervisor.status()["programs"][0]["last_exit_name"] == code.name
    assert run.stop() is ExitCode.OK


@pytest.mark.parametrize("code", [ExitCode.BREAKER_OPEN, ExitCode.WATCHDOG, ExitCode.FATAL_WORKER_ERROR,
                                  ExitCode.HANDED_BACK])
def test_a_restartable_exit_code_restarts_with_backoff_and_is_named(running, code: ExitCode) -> None:
    run = running([exiting("wan", code)])
    wan = run.program("wan")
    wait_for(lambda: wan.state is ProgramState.BACKOFF, what="wan BACKOFF")
    assert f"exited with status {int(code)} ({code.name}); restart in" in wan.reason
    run.thread.join(10)  # FAST: three quick failures, then FATAL; the only program: the run ends
    assert wan.spawns == 3 and "3 quick failures in a row" in wan.reason and code.name in wan.reason
    assert run.code is ExitCode.ALL_FATAL

"""Process hygiene (review #19): orphaned grandchildren are reaped, children are spawned without preexec_fn.

In a container the orchestrator is PID 1, so every orphan of the fleet (a gunicorn worker whose master was
SIGKILLed) becomes its child. ``_as_pid_1`` reproduces that outside a container: the launcher makes itself a
child subreaper (PR_SET_CHILD_SUBREAPER, kept across exec) and execs the orchestrator, which then receives the
orphans exactly as PID 1 would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from common.exit_codes import ExitCode
from common.http import check_health
from local.net import free_port
from orchestrator import child as child_mod
from orchestrator.child import Child

from .support import ROOT, all_running, fake_command, fleet_env, read_events, status, wait_for

LAUNCH_AS_SUBREAPER = ("import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0); "
                       "os.execv(sys.executable, [sys.executable, '-m', 'orchestrator'])")


def gone(pid: int) -> bool:
    """No such process at all: neither running nor a zombie waiting for its parent."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


def program_status(env: dict[str, str], name: str) -> dict:
    return next(p for p in json.loads(status(env, "--json").stdout)["programs"] if p["name"] == name)


@pytest.fixture
def fleet(ports, tmp_path: Path, events: Path):
    procs: list[subprocess.Popen] = []

    def start(*flags: str, as_pid_1: bool = False) -> tuple[subprocess.Popen, dict[str, str]]:
        env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="sdxl", SDXL_MODEL_PATH=str(tmp_path),
                        FLEET_COMMAND_SDXL=" ".join(fake_command("sdxl", events, *flags)),
                        FLEET_BACKOFF_BASE_SECONDS="0.05", FLEET_STOP_GRACE_SECONDS="2",
                        FLEET_KILL_AFTER_SECONDS="1")
        args = ["-c", LAUNCH_AS_SUBREAPER] if as_pid_1 else ["-m", "orchestrator"]
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        wait_for(lambda: all_running(env), timeout=20, what="sdxl RUNNING")
        return proc, env

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_as_pid_1_the_group_of_a_killed_child_leaves_no_zombie(fleet, events: Path) -> None:
    proc, env = fleet("--child", as_pid_1=True)
    leader = program_status(env, "sdxl")["pid"]
    grandchild = next(e["grandchild"] for e in read_events(events) if e["event"] == "grandchild")
    os.kill(leader, signal.SIGKILL)  # the grandchild is orphaned to the orchestrator, then killed with the group
    wait_for(lambda: program_status(env, "sdxl")["restarts"] == 1, what="sdxl restarted")
    wait_for(lambda: gone(grandchild), timeout=5, what="the killed grandchild reaped (no zombie)")
    sdxl = program_status(env, "sdxl")
    assert (sdxl["last_exit"], sdxl["last_exit_name"]) == (-signal.SIGKILL, "SIGKILL")  # our child's status kept
    assert psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    assert not [c for c in psutil.Process(proc.pid).children() if c.status() == psutil.STATUS_ZOMBIE]


def test_the_orchestrator_adopts_and_reaps_orphans_itself(fleet, events: Path) -> None:
    proc, env = fleet("--orphan")
    leader = program_status(env, "sdxl")["pid"]
    orphan = next(e["orphan"] for e in read_events(events) if e["event"] == "orphan")
    os.kill(leader, signal.SIGKILL)  # the orphan has its own session: the group kill does not reach it
    wait_for(lambda: psutil.Process(orphan).ppid() == proc.pid, timeout=5,
             what="the orphan re-parented to the orchestrator (child subreaper)")
    os.kill(orphan, signal.SIGTERM)
    wait_for(lambda: gone(orphan), timeout=5, what="the orphan reaped once it exits")
    wait_for(lambda: program_status(env, "sdxl")["restarts"] == 1, what="sdxl restarted")
    assert program_status(env, "sdxl")["last_exit"] == -signal.SIGKILL
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=20)
    assert proc.returncode == ExitCode.OK, output
    assert f"reaped orphan pid {orphan}" in output


def test_children_are_spawned_without_preexec_fn(monkeypatch, events: Path) -> None:
    """No Python code runs between fork and exec (a threaded parent may deadlock there): the child leads its own
    group (process_group=0, done by subprocess in C) and sets PR_SET_PDEATHSIG itself in an exec wrapper."""
    seen: list[dict] = []

    class Recording(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(child_mod.subprocess, "Popen", Recording)
    spawned: list[Child] = []
    port = free_port()
    command = fake_command("sdxl", events, port=port)

    def spawn_then_end() -> None:  # ends once the program serves: its SIGTERM handler is installed by then
        spawned.append(Child("sdxl", command, dict(os.environ)))
        wait_for(lambda: check_health(f"http://127.0.0.1:{port}/health").ok, what="the program serving")

    spawner = threading.Thread(target=spawn_then_end)
    spawner.start()
    spawner.join()  # the spawning thread is gone: PDEATHSIG (tied to that thread) sends the child SIGTERM
    (child,) = spawned
    try:
        assert seen[0].get("preexec_fn") is None and seen[0].get("process_group") == 0
        wait_for(lambda: any(e["event"] == "sigterm" for e in read_events(events)), timeout=10,
                 what="SIGTERM from PR_SET_PDEATHSIG when the spawning thread ended")
        assert os.getpgid(child.pid) == child.pid or child.poll() is not None
        wait_for(lambda: child.poll() is not None, what="the child exited on its SIGTERM")
    finally:
        child.kill_group()


def test_the_exec_wrapper_does_not_run_the_command_once_its_parent_is_gone(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    wrapper = ROOT / "orchestrator" / "exec_wrapper.py"
    not_our_parent = str(os.getppid())  # pytest's parent, not the wrapper's (pytest)
    result = subprocess.run([sys.executable, "-I", "-S", str(wrapper), not_our_parent, sys.executable, "-c",
                             f"open({str(marker)!r}, 'w')"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and not marker.exists()
    result = subprocess.run([sys.executable, "-I", "-S", str(wrapper), str(os.getpid()), sys.executable, "-c",
                             f"open({str(marker)!r}, 'w')"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and marker.exists(), result.stderr

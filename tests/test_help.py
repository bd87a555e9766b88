"""Every command answers ``--help`` without side effects.

Each command runs in a process of its own, in an empty working directory, with HOME, the XDG directories,
TMPDIR and HF_HOME in a temporary sandbox, under an audit hook (``sys.addaudithook``: the interpreter's own
record of what the process does). After ``--help`` it must have exited 0 and printed a usage line, connected
no socket and listened on none (a bind to port 0 that never listens is a library's probe), left no thread
running, started no process, opened no file for writing, created or removed nothing, left the
sandbox empty, and not imported torch (none of these commands needs it to describe itself).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "workers": ["-m", "workers"],
    "orchestrator": ["-m", "orchestrator"],
    "router": ["-m", "router"],
    "memory_manager": ["-m", "memory_manager"],
    "registration": ["-m", "registration"],
    "demo": ["-m", "local.demo"],
    "demo_models": ["-m", "local.demo_models"],
    "wan_generate": [str(ROOT / "wan_generate.py")],
    "bench": ["-m", "bench"],
}

# Runs one command's __main__ with --help under the audit hook, then writes what it saw to argv[2].
PROBE = r'''
import json, os, runpy, sys

kind, target, report = sys.argv[1], sys.argv[2], sys.argv[3]
seen = {"sockets": [], "processes": [], "writes": []}
recording = True
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PROCESSES = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
             "pty.spawn"}
CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
           "shutil.rmtree", "shutil.copyfile", "shutil.move"}


def _ephemeral(address):
    """A bind to port 0 is a probe (urllib3's IPv6 check at import, a free-port lookup) until it listens."""
    return isinstance(address, tuple) and len(address) >= 2 and address[1] == 0


def hook(event, args):
    if not recording:
        return
    if event == "socket.connect" or (event == "socket.bind" and not _ephemeral(args[1])):
        seen["sockets"].append(f"{event} {args[1]!r}")
    elif event in PROCESSES:
        seen["processes"].append(f"{event} {args[0]!r}" if args else event)
    elif event in CHANGES:
        seen["writes"].append(f"{event} {args[0]!r}")
    elif event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
            seen["writes"].append(f"open {path!r} {mode or flags}")


sys.addaudithook(hook)
sys.argv = [target, "--help"]
code = 0
try:
    if kind == "path":
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
recording = False
seen["code"] = code
import psutil, threading
seen["sockets"] += [f"listening on {c.laddr}" for c in psutil.Process().net_connections("all")
                    if c.status == psutil.CONN_LISTEN]
seen["threads"] = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
seen["modules"] = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
with open(report, "w") as handle:
    json.dump(seen, handle)
'''


def sandbox_env(sandbox: Path) -> dict[str, str]:
    """This process's environment with every per-user and temporary directory moved into ``sandbox``."""
    dirs = {"HOME": "home", "XDG_CONFIG_HOME": "config", "XDG_CACHE_HOME": "cache", "XDG_DATA_HOME": "data",
            "XDG_STATE_HOME": "state", "XDG_RUNTIME_DIR": "runtime", "TMPDIR": "tmp", "HF_HOME": "hf"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    for name, folder in dirs.items():
        (sandbox / folder).mkdir()
        env[name] = str(sandbox / folder)
    env.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    return env


def files_in(sandbox: Path) -> list[str]:
    return sorted(str(p.relative_to(sandbox)) for p in sandbox.rglob("*") if not p.is_dir())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_prints_usage_and_does_nothing_else(tmp_path: Path, name: str) -> None:
    if name == "registration" and not (ROOT / "registration" / "__main__.py").exists():
        pytest.skip("python -m registration does not exist yet (registration/__main__.py is being written)")
    sandbox, probe = tmp_path / "sandbox", tmp_path / "probe"
    sandbox.mkdir()
    probe.mkdir()
    (probe / "probe.py").write_text(PROBE)
    report = probe / "report.json"
    command = COMMANDS[name]
    kind, target = ("path", command[0]) if command[0].endswith(".py") else ("module", command[1])
    work = sandbox / "cwd"
    work.mkdir()

    result = subprocess.run([sys.executable, str(probe / "probe.py"), kind, target, str(report)], cwd=work,
                            env=sandbox_env(sandbox), capture_output=True, text=True, timeout=180)

    said = f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, said
    seen = json.loads(report.read_text())
    assert seen["code"] in (0, None), said
    assert result.stdout.lstrip().startswith("usage:"), said
    assert seen["sockets"] == [], "--help opened sockets"
    assert seen["threads"] == [], "--help left threads running"
    assert seen["processes"] == [], "--help started processes"
    assert seen["writes"] == [], "--help wrote or changed files"
    assert files_in(sandbox) == [], "--help left files behind"
    assert "torch" not in seen["modules"], f"--help imported {seen['modules']}"

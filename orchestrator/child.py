"""A child process of the orchestrator: leading its own process group, dying with its parent, output prefixed.

- ``process_group=0``: the child leads its own process group, so the orchestrator can signal the leader alone
  (a warm stop the program handles itself, e.g. gunicorn stopping its workers) and SIGKILL the whole group at
  the end (nothing left behind).
- ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: if the orchestrator dies, even by SIGKILL, the kernel sends the child
  SIGTERM. It is set by :mod:`orchestrator.exec_wrapper`, which the child runs first and which then execs the
  program in place: no Python code runs between fork and exec (``preexec_fn`` can deadlock a child forked from
  a threaded parent). Linux ties PDEATHSIG to the *thread* that forked the child, so the supervisor spawns
  every child from its one long-lived loop thread.
- stdout and stderr go through a pipe to a pump thread that logs each line as ``<name> | <line>`` (with
  ``LOG_FORMAT=json``, a child's JSON line as that object plus ``program``).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.logs import relayed

log = logging.getLogger("orchestrator.child")

MAX_LINE_CHARS = 8000
EXEC_WRAPPER = Path(__file__).with_name("exec_wrapper.py")


def _wrapped(command: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The exec wrapper's command line for ``command``; OSError now if the program cannot be found, so that
    the supervisor reports "cannot execute" at once instead of a child that exits 127."""
    if not command or shutil.which(command[0], path=env.get("PATH", os.defpath)) is None:
        name = command[0] if command else ""
        raise FileNotFoundError(errno.ENOENT, "no such executable program", name)
    return [sys.executable, "-I", "-S", str(EXEC_WRAPPER), str(os.getpid()), *command]


class Child:
    """One spawned process (the leader of its own process group)."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: str | None = None):
        self.name = name
        self._proc = subprocess.Popen(
            _wrapped(command, env), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, process_group=0,
        )
        self.pid = self._proc.pid
        self._pump = threading.Thread(target=self._forward_output, name=f"output-{name}", daemon=True)
        self._pump.start()

    def poll(self) -> int | None:
        """The exit status once the leader has exited (negative: killed by that signal), else None."""
        return self._proc.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the leader only (the program decides what to do with its own children)."""
        if self._proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process in the group (the leader and, e.g., its gunicorn worker)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_group(self) -> None:
        """SIGKILL the whole process group: the leader and anything it left behind."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("%s: pid %d did not die after SIGKILL", self.name, self.pid)

    def _forward_output(self) -> None:
        assert self._proc.stdout is not None
        with self._proc.stdout:
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    log.info("%s | %s", self.name, line[:MAX_LINE_CHARS], extra=relayed(self.name, line))

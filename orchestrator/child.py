"""A child process of the orchestrator: spawned in its own session, dying with its parent, output prefixed.

- ``start_new_session=True``: the child leads its own process group, so the orchestrator can signal the
  leader alone (a warm stop the program handles itself, e.g. gunicorn stopping its workers) and SIGKILL the
  whole group at the end (nothing left behind).
- ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in the child before ``exec``: if the orchestrator dies, even by
  SIGKILL, the kernel sends the child SIGTERM. Linux ties this to the *thread* that forked the child, so
  the supervisor spawns every child from its one long-lived loop thread.
- stdout and stderr go through a pipe to a pump thread that logs each line as ``<name> | <line>``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import threading
from typing import Callable, Mapping, Sequence

log = logging.getLogger("orchestrator.child")

PR_SET_PDEATHSIG = 1
MAX_LINE_CHARS = 8000


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()  # loaded once in the parent: the child must not import or load anything before exec


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    libc = _LIBC

    def preexec() -> None:  # runs in the child between fork and exec: keep it to two system calls
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class Child:
    """One spawned process (the leader of its own process group)."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: str | None = None):
        self.name = name
        self._proc = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
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
                    log.info("%s | %s", self.name, line[:MAX_LINE_CHARS])

"""Orphans of the fleet: the orchestrator adopts them (child subreaper) and reaps them when they exit.

In a container the orchestrator is PID 1, and every process whose parent dies is re-parented to it: the gunicorn
worker of a master that was SIGKILLed, a helper a worker left behind. Outside a container it makes itself a
child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) so the same happens. Either way each such process becomes a
zombie once it exits unless the orchestrator waits for it, and zombies pile up with every restart.

Reaping must not steal the exit status of the orchestrator's own children (``subprocess.Popen`` reads it to
tell a crash from a config error). So :func:`reap_orphans` first *looks* at the next exited child without
reaping it (``waitid(..., WNOWAIT)``) and reaps it only when its pid is not one of ours.
"""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Container

log = logging.getLogger("orchestrator")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans. False where the kernel refuses it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_orphans(ours: Container[int]) -> list[tuple[int, int]]:
    """Reap every exited child that is not in ``ours``; returns ``(pid, exit code)`` pairs (negative: signal).

    It stops at the first exited child of ours (left for its ``Popen``); the caller polls its own children
    before calling, so that wait lasts at most one supervisor pass.
    """
    reaped = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            break
        if info is None or info.si_pid in ours:
            break
        pid, status = os.waitpid(info.si_pid, os.WNOHANG)
        if pid == 0:  # already reaped by someone else between the two calls
            continue
        reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped

"""``python -I -S exec_wrapper.py <parent-pid> <command...>``: ask for PR_SET_PDEATHSIG, then exec the command.

Why a wrapper: the orchestrator has threads (status server, registration, output pumps), and Python code run
between fork and exec (``preexec_fn``) can deadlock the child on a lock another thread held at the fork. So
the orchestrator spawns this script with plain ``subprocess`` options only (``process_group=0`` is done in C),
and the script, already a fresh single-threaded process, does what ``preexec_fn`` did:

- ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM when the thread that spawned us ends (the
  orchestrator dies, even by SIGKILL). The setting survives ``exec``;
- if the parent is no longer ``<parent-pid>``, the orchestrator died before the prctl took effect: exit;
- ``exec`` the command in place: same pid, same process group, so the orchestrator's view is unchanged.

Standard library only, and run with ``-I -S``, so it adds a few tens of milliseconds to a spawn.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_GONE = 1
CANNOT_EXECUTE = 127  # the shell's code for "command not found / not executable"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: exec_wrapper.py <parent-pid> <command> [args...]", file=sys.stderr)
        return CANNOT_EXECUTE
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        print(f"exec_wrapper: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return CANNOT_EXECUTE
    if os.getppid() != int(argv[0]):
        return PARENT_GONE
    try:
        os.execvp(argv[1], argv[1:])
    except OSError as exc:
        print(f"exec_wrapper: cannot execute {argv[1]!r}: {exc.strerror}", file=sys.stderr)
    return CANNOT_EXECUTE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

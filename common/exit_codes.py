"""Every exit code of every fleet process, in one table; the orchestrator reads its children's codes here.

Values are unique across processes so that a code in a log says what happened without knowing who exited.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0                   # stopped on request (orchestrator: every child exited within the grace period)
    KILLED_CHILDREN = 1      # orchestrator: stopped on request; some child had to be SIGKILLed
    BOOT_FAILED = 3          # worker: model setup failed (gunicorn's WORKER_BOOT_ERROR) → FATAL at once
    APP_LOAD_FAILED = 4      # worker: the app could not be built (gunicorn's APP_LOAD_ERROR) → FATAL at once
    STATUS_UNAVAILABLE = 69  # orchestrator `status`: no orchestrator answers on the status port (EX_UNAVAILABLE)
    FATAL_WORKER_ERROR = 70  # worker: FatalWorkerError (GPU lost, model gone); the job was handed back → restart
    HANDED_BACK = 75         # worker: cold stop; the current job went back to its queue (EX_TEMPFAIL)
    BREAKER_OPEN = 76        # worker: N jobs in a row failed for reasons not the job's → restart
    WATCHDOG = 77            # worker: a job overran its deadline and did not stop; handed back (counted) → restart
    CONFIG_ERROR = 78        # any process: a setting is missing or malformed (EX_CONFIG) → FATAL at once
    ALL_FATAL = 80           # orchestrator: every program ended FATAL; nothing left to supervise
    NO_PROGRAMS = 81         # orchestrator: nothing to run (FLEET_PROGRAMS empty, or every model worker skipped)

    @property
    def restart_is_futile(self) -> bool:
        """A child that exits with this code will fail the same way again: FATAL at once, no backoff."""
        return self in (ExitCode.BOOT_FAILED, ExitCode.APP_LOAD_FAILED, ExitCode.CONFIG_ERROR)

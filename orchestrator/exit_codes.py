"""Named exit codes of ``python -m orchestrator`` (and of its ``status`` command)."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0                  # stopped on request; every child exited by itself within the grace period
    KILLED_CHILDREN = 1     # stopped on request; some child had to be SIGKILLed
    ALL_FATAL = 3           # every program ended FATAL: nothing left to supervise
    NO_PROGRAMS = 4         # nothing to run (FLEET_PROGRAMS empty, or every model worker skipped)
    STATUS_UNAVAILABLE = 69  # `status`: no orchestrator answers on the status port (EX_UNAVAILABLE)
    CONFIG_ERROR = 78       # a setting is missing or malformed (EX_CONFIG)

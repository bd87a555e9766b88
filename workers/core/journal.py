"""The job journal: one small record per terminal outcome, for the ops page (``router/collector.py``).

``{"id", "type", "outcome", "seconds", "worker", "attempt", "error_type", "t"}`` is pushed to ``jobs:journal``
(``common.keys``) and the list trimmed to ``JOURNAL_MAX`` records, both in one script (one round trip).

What a record may hold is fixed here: the first 8 characters of the job id, never the whole id, and nothing
a user wrote (no prompt, no message, no error message: only the error's type). The journal is written after
the job's terminal step and callback, and every failure to write it is swallowed: it is an operator's view,
and must never fail, retry or hold up a job.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from common import keys

from .transport import Transport

log = logging.getLogger(__name__)

ID_PREFIX = 8
# KEYS journal; ARGV[1] record, [2] cap
_PUSH = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
return 1
"""


def record(job_id: str, job_type: str, outcome: str, seconds: float | None, worker_id: str,
           attempt: int | None, error_type: str | None, at: float) -> dict[str, Any]:
    """The record of one terminal outcome: only these fields, each of a known kind."""
    return {"id": job_id[:ID_PREFIX], "type": job_type, "outcome": outcome,
            "seconds": None if seconds is None else round(max(0.0, seconds), 3), "worker": worker_id,
            "attempt": attempt, "error_type": error_type, "t": round(at, 3)}


def error_type_of(body: bytes) -> str | None:
    """The ``error_type`` of a ``failed`` callback body (its metadata), or None; never its message."""
    try:
        value = json.loads(body).get("metadata", {}).get("error_type")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class Journal:
    """Writes records to ``jobs:journal`` through the worker's transport, best effort."""

    def __init__(self, transport: Transport, worker_id: str, cap: int = keys.JOURNAL_MAX,
                 wall: Callable[[], float] = time.time):
        self.transport = transport
        self.worker_id = worker_id
        self.cap = cap
        self.wall = wall

    def write(self, job_id: str, job_type: str, outcome: str, seconds: float | None, attempt: int | None,
              body: bytes) -> None:
        """Record one terminal outcome; a Redis error (or anything else) is logged at debug level and dropped."""
        try:
            entry = record(job_id, job_type, outcome, seconds, self.worker_id, attempt,
                           error_type_of(body) if outcome != "completed" else None, self.wall())
            self.transport.command("EVAL", _PUSH, 1, keys.JOURNAL, json.dumps(entry), self.cap)
        except Exception as exc:  # noqa: BLE001 - the journal never fails a job
            log.debug("job journal not written (%s)", type(exc).__name__)

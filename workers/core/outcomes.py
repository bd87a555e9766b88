"""How the runner reads a job's failure and writes its terminal callback body: pure functions of the job and
the exception, kept apart from the loop so the loop reads as the recipe in ``runner``'s docstring.

Typed errors decide: ``InvalidJob``/``WorkerError`` fail the job now; ``RetryableError``, a passed deadline
and unexpected exceptions are retried. Failures that are not the job's fault (unexpected exceptions, OOM,
model loads) are what the runner's circuit breaker counts.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Any

from . import callbacks as cb
from .errors import ErrorType, JobCancelled, RetryableError, WorkerError
from .job import Job

log = logging.getLogger(__name__)

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
APP_OWNED_KEYS = frozenset({"destination", "scene_id", "character_id", "conversation_id", "project_id",
                            "user_id", "job_id", "status", "credits", "cost"})
NOT_THE_JOBS_FAULT = frozenset({ErrorType.OOM_ERROR, ErrorType.MODEL_LOAD_ERROR})


def not_the_jobs_fault(exc: Exception) -> bool:
    """Failures the breaker counts: anything unexpected (CUDA errors, a full disk, bugs), OOM, model loads."""
    return not isinstance(exc, WorkerError) or (not isinstance(exc, JobCancelled)
                                                and exc.error_type in NOT_THE_JOBS_FAULT)


def first_line(exc: Exception) -> str:
    """For the operator (``/health``, the log): the exception's type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def retryable(exc: Exception) -> bool:
    if isinstance(exc, JobCancelled):
        return exc.reason == "deadline"
    return isinstance(exc, RetryableError) or not isinstance(exc, WorkerError)


def as_worker_error(job: Job, exc: Exception) -> WorkerError:
    """The wire error for ``exc``, logged once; never a path, a stack trace or a secret on the wire."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        # Any handler's temporary files (e.g. the MP4 encoder's): say so clearly; no path in the message.
        log.error("job %s (%s): the worker's disk is full: %s", job.id, job.type.value, exc)
        return WorkerError(f"no space left on the worker's disk for temporary files ({os.strerror(exc.errno)})",
                           ErrorType.INTERNAL_ERROR)
    if not isinstance(exc, WorkerError):
        log.exception("job %s (%s) raised an unexpected error", job.id, job.type.value)
        return WorkerError("internal error while running the job", ErrorType.INTERNAL_ERROR)
    log.warning("job %s (%s) failed: %s %s", job.id, job.type.value, exc.error_type.value, exc.message)
    return exc


def completed_metadata(job: Job, metadata: dict[str, Any], worker_id: str, seconds: float) -> dict[str, Any]:
    """The handler's metadata without the keys the app owns (CONTRACT §4: it is merged over the app's)."""
    clean = {k: v for k, v in metadata.items() if k not in APP_OWNED_KEYS}
    return {**clean, "job_type": job.type.value, "worker_id": worker_id, "processing_time": round(seconds, 3)}


def failed_body(job_id: str, job: Job | None, error: WorkerError, worker_id: str) -> bytes:
    metadata = {"job_type": job.type.value if job else None, "error_type": error.error_type.value,
                "retryable": error.retryable, "worker_id": worker_id}
    return cb.encode(job_id, worker_id, "failed", [], error.message, metadata)

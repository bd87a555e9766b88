"""Typed errors: each says what the caller should do (CONTRACT §7).

``error_type`` is the wire code sent as ``metadata.error_type``; ``message`` is short, human and safe to
send to the app (never a path, a stack trace or a secret).
"""
from __future__ import annotations

from enum import Enum


class ErrorType(str, Enum):
    INVALID_PROMPT = "INVALID_PROMPT"
    INVALID_JOB = "INVALID_JOB"
    OOM_ERROR = "OOM_ERROR"
    MODEL_LOAD_ERROR = "MODEL_LOAD_ERROR"
    WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"
    TIMEOUT_ERROR = "TIMEOUT_ERROR"
    REFERENCE_FRAME_ERROR = "REFERENCE_FRAME_ERROR"
    STORAGE_ERROR = "STORAGE_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def retryable(self) -> bool:
        """Whether running the job again could succeed."""
        return self not in (ErrorType.INVALID_PROMPT, ErrorType.INVALID_JOB,
                            ErrorType.REFERENCE_FRAME_ERROR)


class WorkerError(Exception):
    """A job-level failure with a wire code and a client-safe message."""

    error_type: ErrorType = ErrorType.INTERNAL_ERROR

    def __init__(self, message: str, error_type: ErrorType | None = None):
        super().__init__(message)
        self.message = message
        if error_type is not None:
            self.error_type = error_type

    @property
    def retryable(self) -> bool:
        return self.error_type.retryable


class InvalidJob(WorkerError):
    """Reject: the input is wrong and will never succeed. ``job_id`` is set once the id is known."""

    error_type = ErrorType.INVALID_JOB

    def __init__(self, message: str, job_id: str | None = None,
                 error_type: ErrorType = ErrorType.INVALID_JOB):
        super().__init__(message, error_type)
        self.job_id = job_id


class RetryableError(WorkerError):
    """Retry: a transient failure; the job goes back to the queue (after ``delay`` seconds at least)."""

    def __init__(self, message: str, error_type: ErrorType = ErrorType.INTERNAL_ERROR,
                 delay: float = 0.0):
        super().__init__(message, error_type)
        self.delay = delay


class JobCancelled(WorkerError):
    """Raised by the runner's ``progress`` callable (the one cancellation point of every handler) once the
    job must stop: its deadline passed (``TIMEOUT_ERROR``) or the app cancelled it. Handlers let it propagate,
    cleaning up on the way (a chat handler cancels its engine request)."""

    def __init__(self, message: str, error_type: ErrorType = ErrorType.TIMEOUT_ERROR, reason: str = "deadline"):
        super().__init__(message, error_type)
        self.reason = reason   # "deadline" | "cancelled"


class FatalWorkerError(Exception):
    """Crash and restart: the process is unusable (model gone, GPU lost). The current job is handed back."""

"""How the generation loop words its failures to callers: a full waiting line, a failed prefill or step."""
from __future__ import annotations

import logging

import torch

from workers.core.errors import ErrorType, RetryableError, WorkerError

log = logging.getLogger("workers.chat.engine")

RETRY_AFTER_SECONDS = 5.0
"""What a shed request is told to wait (``Retry-After``): a few decode rounds free rows."""


class Overloaded(RetryableError):
    """The waiting line is full: refused at once (HTTP 503 + Retry-After) rather than queued behind it."""

    def __init__(self, waiting: int):
        super().__init__(f"the chat worker is at capacity ({waiting} requests waiting); retry shortly",
                         ErrorType.WORKER_UNAVAILABLE, delay=RETRY_AFTER_SECONDS)


def as_worker_error(exc: Exception) -> WorkerError:
    """The callers' error for a failed prefill or step (memory is released by the caller, once nothing refers
    to the failed batch any more)."""
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        log.error("out of memory during generation")
        return RetryableError("out of GPU memory during generation", ErrorType.OOM_ERROR, delay=1.0)
    log.error("generation failed", exc_info=exc)
    return WorkerError("generation failed", ErrorType.INTERNAL_ERROR)

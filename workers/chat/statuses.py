"""The HTTP status of each typed error of the chat routes (api.py, openai.py), and when to send Retry-After."""
from __future__ import annotations

import math

from workers.core.errors import ErrorType, RetryableError, WorkerError

CLIENT_GONE = 499   # nginx's "client closed request": nobody reads it; the access log and the metrics do


def status_of(exc: WorkerError) -> int:
    if exc.error_type is ErrorType.TIMEOUT_ERROR:
        return 504
    if exc.error_type in (ErrorType.WORKER_UNAVAILABLE, ErrorType.MODEL_LOAD_ERROR, ErrorType.OOM_ERROR):
        return 503
    return 500


def retry_after(exc: WorkerError, status: int) -> dict[str, str]:
    """``Retry-After`` for a 503 that a retry can cure (a retryable error with a delay), else no header."""
    if status == 503 and isinstance(exc, RetryableError) and exc.delay > 0:
        return {"Retry-After": str(max(1, math.ceil(exc.delay)))}
    return {}

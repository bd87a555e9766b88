"""Chat after an eviction: reload on demand.

The memory manager frees chat's GPU memory for on-demand work with ``/memory/unload`` (the service then marks
itself ``unloaded``). Its own reload waits for the on-demand workers to go quiet, which a WAN backlog can
postpone indefinitely; meanwhile every /chat, /enhance and /v1/* call would answer 503 "no chat model is
loaded". Instead, the next request that needs a model reloads it: through the service's ``_load`` (reserve
with the memory manager first, then load), under the service's ``gpu_lock`` so it never races a job or an
unload, waiting at most ``CHAT_RELOAD_WAIT_SECONDS`` for that lock. A lock still held, or a reservation the
manager refuses, is a 503 with Retry-After; concurrent requests wait for the first one's reload.
"""
from __future__ import annotations

import logging
from typing import Any

from workers.core.errors import ErrorType, RetryableError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5.0


def reload_if_evicted(service: Any, which: str, wait_seconds: float) -> None:
    """Load ``which`` again if the service was unloaded (evicted); return once it is loaded."""
    if not service.unloaded:
        return
    if not service.gpu_lock.acquire(timeout=wait_seconds):
        raise RetryableError("the chat model is being reloaded or the GPU is busy; retry shortly",
                             ErrorType.WORKER_UNAVAILABLE, delay=RETRY_AFTER_SECONDS)
    try:
        if service.unloaded:   # not reloaded meanwhile by the request that held the lock
            log.info("chat was unloaded (evicted); reloading %s for a request", which)
            service._load(which)
    finally:
        service.gpu_lock.release()

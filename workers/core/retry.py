"""The one retry policy of every outgoing HTTP call (callbacks, storage uploads, reference downloads), on
tenacity: exponential backoff with jitter and a capped delay, a server's ``Retry-After`` honoured, and a
budget (a deadline on the clock, a number of tries, a longest wait). A call that would have to wait past its
budget stops at once instead of sleeping for nothing; the caller decides what "not delivered" means.

Each try returns an ``Answer``; only ``retry=True`` answers are tried again, and exceptions propagate, so
what is final (a 4xx, an invalid request) stays the caller's decision. ``sleep`` and ``clock`` are
injectable so tests run the real policy without real waiting.
"""
from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_result
from tenacity.wait import wait_exponential_jitter


@dataclass(frozen=True)
class Answer:
    """One try's outcome: ``value`` when final; ``retry=True`` (with the server's ``retry_after`` seconds, if
    it said) when another try may help; ``problem`` says why, for the log (never a secret)."""

    value: Any = None
    retry: bool = False
    retry_after: float | None = None
    problem: str = ""


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` when absent or bad."""
    value = (headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def call(attempt: Callable[[], Answer], *, initial: float, cap: float, deadline: float | None = None,
         tries: int | None = None, longest_wait: float | None = None,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
         on_retry: Callable[[Answer], None] | None = None) -> Answer:
    """Run ``attempt`` until its answer is final or the budget is spent; return the last answer.

    Waits are ``initial * 2**n`` plus up to ``initial`` of jitter, at most ``cap``, and at least what the
    server asked for in ``Retry-After``. It stops before a wait that would end past ``deadline`` (on
    ``clock``), after ``tries`` tries, or before a wait longer than ``longest_wait``. ``on_retry`` is told
    each answer that is tried again (the retry counters), before the wait."""
    backoff = wait_exponential_jitter(initial=initial, max=cap, jitter=initial)

    def wait(state: RetryCallState) -> float:
        asked = state.outcome.result().retry_after if state.outcome else None
        return max(backoff(state), asked or 0.0)

    def stop(state: RetryCallState) -> bool:
        return ((tries is not None and state.attempt_number >= tries)
                or (deadline is not None and clock() + state.upcoming_sleep > deadline)
                or (longest_wait is not None and state.upcoming_sleep > longest_wait))

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            on_retry(state.outcome.result())

    retrying = Retrying(sleep=sleep, wait=wait, stop=stop, retry=retry_if_result(lambda answer: answer.retry),
                        retry_error_callback=lambda state: state.outcome.result(), reraise=True,
                        before_sleep=before_sleep)
    return retrying(attempt)

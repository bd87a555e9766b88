"""Has the app cancelled this job? (CONTRACT §1: the app sets ``jobs.status = 'cancelled'`` and leaves the
element in the queue.) Cancellation is an optimisation: a job whose status cannot be read runs as before.

The signal is the app's ``jobs`` row, read with the service role through Supabase's REST API
(``GET {SUPABASE_URL}/rest/v1/jobs?id=eq.<id>&select=status``). Not the ``skipped`` answer of ``job-callback``:
CONTRACT §4 gives it for a job that is unknown, completed *or* cancelled, so it cannot tell a cancelled job
from one the app does not know (a test job, a job of another project), and progress callbacks are one
best-effort try each, so their answers may never come. The row says ``cancelled`` or it does not: one GET of
one column by primary key, one lookup per check.

When (``CancelChecks``): once before a job starts, waited for at most the lookup's timeout; then while it runs,
at most every ``CANCEL_CHECK_SECONDS``, from the runner's ``progress`` callable (the handlers' cooperative
point: between diffusion steps, and every engine wait slice of a chat job). Those mid-run lookups run on a
background thread, at most one in flight per job: a progress call never waits for the network, because a
blocking 2 s lookup every 10 s would leave the GPU of a 1 s/step WAN video idle 20% of the time when
Supabase is slow. A progress call only reads the last answer; the first one after a ``cancelled`` answer
raises ``JobCancelled(reason="cancelled")``, so the job stops within one step of the answer.

An answer that is not a well-formed ``200`` with zero or one row (Supabase down, 4xx/5xx, a timeout, a
malformed body) is ``UNKNOWN``, and so is a missing row: the job runs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import requests

from common.settings import Settings

from .errors import JobCancelled

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 2.0


class Verdict(StrEnum):
    CANCELLED = "cancelled"
    NOT_CANCELLED = "not cancelled"
    UNKNOWN = "unknown"   # no answer, or one that says nothing: run the job as if not cancelled


class JobStatusLookup:
    """One ``jobs`` row's ``status`` over Supabase REST with the service key (Bearer + ``apikey``)."""

    def __init__(self, url: str, service_key: str, timeout: float = LOOKUP_TIMEOUT_SECONDS,
                 session: requests.Session | None = None):
        self.endpoint = url.rstrip("/") + "/rest/v1/jobs"
        self._headers = {"apikey": service_key, "Authorization": f"Bearer {service_key}",
                         "Accept": "application/json"}
        self.timeout = timeout
        self.session = session or requests.Session()
        self._failing = False

    def verdict(self, job_id: str) -> Verdict:
        """Whether the app cancelled ``job_id``; ``UNKNOWN`` on any failure (logged once per outage)."""
        try:
            response = self.session.get(self.endpoint, params={"id": f"eq.{job_id}", "select": "status"},
                                        headers=self._headers, timeout=self.timeout)
        except requests.RequestException as exc:
            return self._failed(type(exc).__name__)
        if response.status_code != 200:
            return self._failed(f"HTTP {response.status_code}")
        try:
            status = _status(response.json())
        except ValueError as exc:
            return self._failed(f"malformed answer: {exc}")
        if self._failing:
            self._failing = False
            log.info("job status lookups answer again")
        if status is None:
            return Verdict.UNKNOWN
        return Verdict.CANCELLED if status == "cancelled" else Verdict.NOT_CANCELLED

    def _failed(self, problem: str) -> Verdict:
        if not self._failing:
            self._failing = True
            log.warning("job status lookup failed (%s): jobs run as if not cancelled until lookups answer", problem)
        else:
            log.debug("job status lookup failed (%s)", problem)
        return Verdict.UNKNOWN


def _status(rows: Any) -> str | None:
    """The status of PostgREST's answer (a list of zero or one ``{"status": "<text>"}``); ``None`` for no row.
    ``ValueError`` (the body was not JSON either) for anything else."""
    if not isinstance(rows, list) or len(rows) > 1:
        raise ValueError("expected a list of at most one row")
    if not rows:
        return None
    row = rows[0]
    if not isinstance(row, dict) or not isinstance(row.get("status"), str):
        raise ValueError("expected a row with a text status")
    return row["status"]


class CancelChecks:
    """The lookup and how often a running job asks it; ``watch(job_id)`` makes one job's ``CancelWatch``."""

    def __init__(self, lookup: JobStatusLookup, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if every <= 0:
            raise ValueError("every must be positive (no CancelChecks at all turns the checks off)")
        self.lookup, self.every, self.clock = lookup, every, clock

    @classmethod
    def from_settings(cls, settings: Settings) -> CancelChecks | None:
        """``None`` (no checks) with ``CANCEL_CHECK_SECONDS=0`` or without Supabase (local runs, tests)."""
        if not settings.cancel_check_seconds or not (settings.supabase_url and settings.supabase_service_key):
            return None
        return cls(JobStatusLookup(settings.supabase_url, settings.supabase_service_key.reveal()),
                   settings.cancel_check_seconds)

    def watch(self, job_id: str) -> CancelWatch:
        return CancelWatch(self, job_id)


class CancelWatch:
    """One job's checks: ``before_start`` (one lookup, waited for) and ``poll`` (from ``progress``, never waits).

    Each lookup runs on a thread of its own, at most one at a time; a lookup still running when its waiter gave
    up keeps going, and its answer is seen by the next ``poll``."""

    def __init__(self, checks: CancelChecks, job_id: str):
        self.checks, self.job_id = checks, job_id
        self.cancelled = False
        self._done: threading.Event | None = None   # the lookup in flight (or the last one)
        self._last: float | None = None             # when the last lookup started (checks.clock)

    def before_start(self) -> bool:
        """Whether the app cancelled the job, waiting at most the lookup's timeout for the answer."""
        self._launch().wait(self.checks.lookup.timeout)
        return self.cancelled

    def poll(self) -> None:
        """Raise ``JobCancelled(reason="cancelled")`` once a lookup said so; start the next lookup when due."""
        if self.cancelled:
            raise JobCancelled(f"job {self.job_id} was cancelled by the app", reason="cancelled")
        in_flight = self._done is not None and not self._done.is_set()
        if not in_flight and (self._last is None or self.checks.clock() - self._last >= self.checks.every):
            self._launch()

    def _launch(self) -> threading.Event:
        done = self._done = threading.Event()
        self._last = self.checks.clock()
        threading.Thread(target=self._look, args=(done,), name="cancel-check", daemon=True).start()
        return done

    def _look(self, done: threading.Event) -> None:
        try:
            if self.checks.lookup.verdict(self.job_id) is Verdict.CANCELLED:
                self.cancelled = True
        except Exception:  # a bug here must never cost the job: it runs as if not cancelled
            log.exception("job status lookup of %s raised", self.job_id)
        finally:
            done.set()

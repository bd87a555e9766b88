"""The per-job watchdog: the last resort against a job that ignores its cancellation (review #4).

The runner's ``progress`` callable raises ``JobCancelled`` once the job's deadline has passed, which stops every
handler that reports progress. A job that does not (blocked in a C call, a dripping socket, a wedged GPU) is
caught here: ``grace`` seconds after the deadline the watchdog calls ``on_overrun(job_id)`` once, and the service
reports unhealthy, hands the job back counted and exits so the orchestrator restarts the process.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from .job import Job


class Watched(Protocol):
    """What the watchdog reads of the runner: the running job, its deadline (monotonic, or None) and whether it
    is past its terminal step (then only its callback delivery runs, bounded by the callback budget)."""

    current_job: Job | None
    deadline: float | None
    settling: bool


class Watchdog:
    def __init__(self, runner: Watched, grace: float, on_overrun: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.grace = grace
        self.on_overrun = on_overrun
        self.clock = clock
        self.interval = min(1.0, max(0.05, grace / 4))

    def overdue(self) -> tuple[str, float] | None:
        """(job id, deadline) of the running job if it is past its deadline and the grace, else None. A job that
        is settling is not overdue: its result is safe, and a callback outage must not restart the worker."""
        job, deadline = self.runner.current_job, self.runner.deadline
        if job is None or deadline is None or self.runner.settling or self.clock() < deadline + self.grace:
            return None
        return job.id, deadline

    def run(self, stop: threading.Event) -> None:
        """Fire once the same job is seen overdue on two ticks in a row: the runner sets a job and its deadline
        one after the other, so a single reading can pair a new job with the previous job's deadline."""
        suspect = None
        while not stop.wait(self.interval):
            seen = self.overdue()
            if seen is not None and seen == suspect:
                self.on_overrun(seen[0])
                return
            suspect = seen

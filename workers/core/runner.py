"""The one job loop, written once for every model kind: it never branches on one.

Recipe for each element (every queue step is one atomic script, see ``queue``):

fetch → decode (undecodable → dead list; bad fields → ``failed``) → begin (a finished job's copy is dropped,
a copy another worker runs goes to the tail; else the attempt is counted and the claim taken; past the limit
→ dead list + ``failed``) → did the app cancel it? (``cancellation``) → ``processing`` callback →
``handler.run`` (its ``progress`` raises ``JobCancelled`` once the job's deadline passed or the app cancelled
it) → is the claim still ours? (else the result is discarded) → upload → settle (done marker + the owed
callback in the outbox under our lease, atomically with the element leaving the processing list) → deliver
the callback → clear the outbox entry (or keep it for the sender).
A job the app cancelled, before or while it runs, takes the terminal step with no callback owed: nothing is
uploaded or sent, and its copies are dropped as done.

Typed errors decide: ``InvalidJob``/``WorkerError`` fail the job now; ``RetryableError``, a passed deadline
and unexpected exceptions hand it back until the attempt limit. Failures that are not the job's fault
(unexpected exceptions such as CUDA errors, OOM, model load errors) feed a circuit breaker: after
``breaker_threshold`` of them in a row, or at once on ``FatalWorkerError``, the job goes back uncounted, the
loop stops and ``trip(code, reason)`` tells the service (which reports unhealthy and exits).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from common import logs
from common.exit_codes import ExitCode

from . import callbacks as cb
from .callbacks import CallbackClient, Outbox, Outcome
from .cancellation import CancelChecks, CancelWatch
from .errors import ErrorType, FatalWorkerError, InvalidJob, JobCancelled, WorkerError
from .handler import Handler, Result
from .job import Job, decode
from .journal import Journal
from .metrics import Metrics
from .outcomes import as_worker_error, completed_metadata, failed_body, first_line, not_the_jobs_fault, retryable
from .queue import Claim, Delivery, ReliableQueue, Settled, Skipped
from .storage import Storage, object_path
from .timeouts import JobTimeouts
from .transport import TransportError

log = logging.getLogger(__name__)

LEASE_MARGIN_SECONDS = 5.0   # the runner's outbox lease outlasts its own delivery budget by this much
MAX_PAUSE_SECONDS = 30.0


def _log_trip(code: ExitCode, reason: str) -> None:
    log.error("the job loop stopped itself (%s): %s", code.name, reason)


class _Tripped(Exception):
    """Unwinds ``process`` once the breaker opened or a ``FatalWorkerError`` came: the job was handed back
    uncounted and the service told; the loop must stop."""


class Runner:
    def __init__(self, *, handler: Handler, queue: ReliableQueue, callbacks: CallbackClient, storage: Storage,
                 metrics: Metrics, worker_id: str, max_attempts: int = 3, gpu_lock: threading.Lock | None = None,
                 before_job: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] | None = None, trip: Callable[[ExitCode, str], None] = _log_trip,
                 breaker_threshold: int = 5, breaker_pause: float = 1.0, timeouts: JobTimeouts = JobTimeouts(),
                 cancel: CancelChecks | None = None):
        """``clock`` times deadlines and jobs; ``sleep`` makes every wait of the runner (the pause before the
        next fetch after a retry, the backoff while Redis is away): ``None`` waits in real time, the loop's
        pauses ending early once its stop event is set; a given one (a simulation, a test) is called instead.
        ``cancel``: how a job learns the app cancelled it (``None``: it never does)."""
        self.handler = handler
        self.queue = queue
        self.callbacks = callbacks
        self.storage = storage
        self.metrics = metrics
        self.worker_id = worker_id
        self.max_attempts = max_attempts
        self.gpu_lock = gpu_lock or threading.Lock()
        self.before_job = before_job
        self.clock = clock
        self.sleep = sleep
        self.trip = trip
        self.breaker_threshold = breaker_threshold
        self.breaker_pause = breaker_pause
        self.timeouts = timeouts
        self.cancel = cancel
        # The runner delivers each terminal callback itself within the client's budget; its lease covers that.
        self.lease_seconds = callbacks.retry_seconds + callbacks.timeout + LEASE_MARGIN_SECONDS
        self.outbox = Outbox(queue.transport, worker_id, self.lease_seconds)
        self.journal = Journal(queue.transport, worker_id)
        self.current: Delivery | None = None
        self.current_job: Job | None = None
        self.deadline: float | None = None     # monotonic; the watchdog escalates past it (plus a grace)
        self.settling = False                  # past the terminal step: the element is gone, the callback owed
        self.progress_state: dict[str, Any] = {}
        self.jobs_done = 0
        self.started = 0.0                     # clock() when the current job was fetched
        self.stopped = False                   # the breaker opened: the loop takes no more jobs
        self._claim: Claim | None = None
        self._watch: CancelWatch | None = None
        self._infra_failures = 0
        self._pause = 0.0
        self._orphan: tuple[Delivery, str] | None = None

    @property
    def claim(self) -> tuple[str, str] | None:
        """``(job_id, token)`` of the job running now, for ``queue.renew_claim`` from the heartbeat."""
        held = self._claim
        return (held.job_id, held.token) if held else None

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event, burst: bool = False) -> None:
        """Take and run jobs until ``stop`` is set or the breaker opens. ``burst`` (rq's ``work(burst=True)``,
        arq's ``burst``): return as soon as a fetch finds the queue empty, to drain a queue from a script."""
        failures = 0
        while not stop.is_set() and not self.stopped:
            if self._pause:
                self._wait(stop, self._pause)
                self._pause = 0.0
                continue
            try:
                self._recover_orphan()
                delivery = self.queue.fetch(0.0 if burst else None)
                failures = 0
            except TransportError as exc:
                # The queue returns whatever a failed move may have taken before its next fetch.
                failures += 1
                log.warning("queue unavailable (%s); retrying", exc)
                self._wait(stop, min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if delivery is None:
                if burst:
                    return
                continue
            if stop.is_set():   # a move in flight when the stop came: the job is not ours to start any more
                self._until_acknowledged(lambda: self.queue.hand_back(delivery))
                continue
            self.process(delivery)

    def _wait(self, stop: threading.Event, seconds: float) -> None:
        (stop.wait if self.sleep is None else self.sleep)(seconds)

    def process(self, delivery: Delivery) -> None:
        self.current, self.started = delivery, self.clock()
        try:
            self._process(delivery, self.started)
        except TransportError as exc:
            # Only at begin (every later step retries until Redis answers): the element stays in our processing
            # list and `run` returns it to the queue once Redis answers again. Nothing is lost.
            log.error("queue unavailable before the job began (%s); it will be returned to the queue", exc)
        except _Tripped:
            self.stopped = True
        finally:
            self.current, self.current_job, self._claim, self.deadline, self._watch = None, None, None, None, None
            self.settling, self.progress_state = False, {}
            logs.clear_job()

    def _process(self, delivery: Delivery, started: float) -> None:
        job = self._decode(delivery)
        if job is None:
            return
        self.current_job = job
        self._orphan = (delivery, job.id)   # until begin's reply arrives
        begun = self.queue.begin(delivery, job.id)
        self._orphan = None
        if isinstance(begun, Skipped):
            return self._skipped(job, begun)
        self._claim = begun
        logs.bind_job(job.id, job.type.value, self.worker_id, begun.attempt)   # on every line until the end
        self.deadline = self.clock() + self.timeouts.seconds_for(job.type)
        if begun.attempt > self.max_attempts:
            error = WorkerError(f"job failed {self.max_attempts} times; giving up", ErrorType.INTERNAL_ERROR)
            return self._settle(delivery, job.id, job, failed_body(job.id, job, error, self.worker_id), "dead",
                                dead_reason=f"attempt limit ({self.max_attempts}) reached")
        self._watch = self.cancel.watch(job.id) if self.cancel else None
        if self._watch is not None and self._watch.before_start():
            return self._cancelled(delivery, job, "before it started")
        self.callbacks.progress(cb.encode(job.id, self.worker_id, "processing",
                                          metadata={"job_type": job.type.value, "worker_id": self.worker_id,
                                                    "attempt": begun.attempt}))
        try:
            with self.gpu_lock:   # before_job too: an unload must not slip in between its check and the job
                self.before_job()
                result = self.handler.run(job, self._progress)
            if not self._until_acknowledged(lambda: self.queue.holds_claim(job.id, begun.token)):
                return self._discard(delivery, job, "its claim was taken over while it ran")
            if self._watch is not None and self._watch.cancelled:   # the answer came after its last step
                return self._cancelled(delivery, job, "as it finished")
            assets = self._store(job, result)
        except Exception as exc:  # typed below: WorkerError subclasses decide, anything else retries
            return self._on_error(delivery, job, exc, begun)
        self._infra_failures = 0
        metadata = completed_metadata(job, result.metadata, self.worker_id, self.clock() - started)
        body = cb.encode(job.id, self.worker_id, "completed", assets, None, metadata)
        self._settle(delivery, job.id, job, body, "completed", started=started)

    def _decode(self, delivery: Delivery) -> Job | None:
        """The job, or ``None`` once a bad element reached its terminal state (dead list, ``failed``)."""
        try:
            job = decode(delivery.raw)
            if job.queue.value != self.queue.queue:
                raise InvalidJob(f"job type {job.type.value} belongs to {job.queue.value}, not {self.queue.queue}",
                                 job.id)
            return job
        except InvalidJob as exc:
            if exc.job_id is None:
                reason = f"undecodable: {exc.message}"
                self._until_acknowledged(lambda: self.queue.dead_letter(delivery, reason))
                self.metrics.jobs.labels("unknown", "dead").inc()
            else:
                self._settle(delivery, exc.job_id, None, failed_body(exc.job_id, None, exc, self.worker_id), "invalid")
            return None

    def _skipped(self, job: Job, skipped: Skipped) -> None:
        log.info("job %s: %s", job.id, skipped.value)
        self.metrics.jobs.labels(job.type.value, skipped.name.lower()).inc()
        if skipped is Skipped.BUSY:
            self._pause = self.queue.poll_max   # do not spin on a copy whose original is still running

    # -- outcomes ------------------------------------------------------------------------------
    def _on_error(self, delivery: Delivery, job: Job, exc: Exception, claim: Claim) -> None:
        if isinstance(exc, JobCancelled) and exc.reason == "cancelled":
            return self._cancelled(delivery, job, "while it ran")
        if isinstance(exc, FatalWorkerError):
            log.error("job %s (%s): fatal worker error: %s", job.id, job.type.value, exc)
            return self._trip(delivery, job, ExitCode.FATAL_WORKER_ERROR, str(exc) or "fatal worker error")
        retry = retryable(exc)
        infra = not_the_jobs_fault(exc)
        error = as_worker_error(job, exc)
        if infra:
            self._infra_failures += 1
            if self._infra_failures >= self.breaker_threshold:
                return self._trip(delivery, job, ExitCode.BREAKER_OPEN,
                                  f"{self._infra_failures} jobs in a row failed for reasons not theirs "
                                  f"(last: {first_line(exc)})")
        if not retry:
            return self._settle(delivery, job.id, job, failed_body(job.id, job, error, self.worker_id), "failed")
        if claim.attempt >= self.max_attempts:
            return self._settle(delivery, job.id, job, failed_body(job.id, job, error, self.worker_id), "dead",
                                dead_reason=f"{error.error_type.value} on the last attempt")
        self._until_acknowledged(lambda: self.queue.hand_back(delivery, job.id, claim.token, count_attempt=True))
        self.metrics.jobs.labels(job.type.value, "retried").inc()
        # Pause before the next fetch, so the retry is likely taken by a healthy worker.
        pause = max(getattr(exc, "delay", 0.0), self.breaker_pause * self._infra_failures if infra else 0.0)
        self._pause = min(pause, MAX_PAUSE_SECONDS)

    def _trip(self, delivery: Delivery, job: Job, code: ExitCode, reason: str) -> None:
        """Not the job's fault: it goes back uncounted, the loop stops, and the service is told."""
        claim = self._claim
        self._until_acknowledged(lambda: self.queue.hand_back(delivery, job.id, claim.token if claim else None))
        self.metrics.jobs.labels(job.type.value, "handed_back").inc()
        self.trip(code, reason)
        raise _Tripped()

    def _discard(self, delivery: Delivery, job: Job, why: str) -> None:
        """Another worker holds the job now: no upload, no callback; return what is still ours."""
        log.warning("job %s: %s; its result is discarded", job.id, why)
        self.metrics.jobs.labels(job.type.value, "claim_lost").inc()
        claim = self._claim
        self._until_acknowledged(lambda: self.queue.hand_back(delivery, job.id, claim.token, count_attempt=True))

    def _cancelled(self, delivery: Delivery, job: Job, when: str) -> None:
        """The app cancelled the job: the terminal step with no callback owed (the app ignores callbacks of a
        cancelled job), so it is never run again; nothing is uploaded."""
        self.settling = True
        token = self._claim.token
        settled = self._until_acknowledged(lambda: self.queue.settle(delivery, job.id, b"", token,
                                                                     self.lease_seconds))
        if settled is Settled.FENCED:
            return self._discard(delivery, job, "its claim was taken over before its terminal step")
        log.info("job %s (%s) was cancelled by the app %s: acknowledged, no callback", job.id, job.type.value, when)
        self.metrics.finished(job.type.value, "cancelled", self.clock() - self.started)
        self.jobs_done += 1
        self.journal.write(job.id, job.type.value, "cancelled", self.clock() - self.started, self._claim.attempt, b"")

    def _settle(self, delivery: Delivery, job_id: str, job: Job | None, body: bytes, outcome: str,
                started: float | None = None, dead_reason: str | None = None) -> None:
        """The terminal step, then the delivery of its callback (see the module docstring)."""
        self.settling = True
        claim = self._claim
        settled = self._until_acknowledged(lambda: self.queue.settle(
            delivery, job_id, body, claim.token if claim else None, self.lease_seconds, dead_reason))
        job_type = job.type.value if job else "unknown"
        if settled is Settled.FENCED:
            return self._discard(delivery, job, "its claim was taken over before its terminal step")
        if settled is Settled.REAPED:
            log.warning("job %s was reaped while it ran; its returned copy will be dropped as done", job_id)
            self.metrics.jobs.labels(job_type, "reaped_while_running").inc()
        self._deliver(job_id, body)
        self.metrics.finished(job_type, outcome, self.clock() - self.started)
        self.jobs_done += 1
        self.journal.write(job_id, job_type, outcome, self.clock() - self.started, claim.attempt if claim else None,
                           body)

    def _deliver(self, job_id: str, body: bytes) -> None:
        outcome = self.callbacks.deliver(body)
        if outcome is Outcome.DELIVERED:
            self._until_acknowledged(lambda: self.outbox.delivered(job_id, body))
        elif outcome is Outcome.REJECTED:
            self._until_acknowledged(lambda: self.outbox.rejected(job_id, body))
        else:
            log.error("callback for job %s not delivered; the outbox sender will retry it", job_id)
            self._until_acknowledged(lambda: self.outbox.release(job_id))

    def _until_acknowledged(self, step: Callable[[], Any]) -> Any:
        """Run a queue step across a Redis outage, retrying with backoff until Redis answers: a lost terminal
        step or hand-back would leave the job's fate unknown."""
        delay = 0.5
        while True:
            try:
                return step()
            except TransportError as exc:
                log.warning("queue unavailable for an acknowledgement (%s); retrying in %.1f s", exc, delay)
                (self.sleep or time.sleep)(delay)
                delay = min(delay * 2, 10.0)

    def _recover_orphan(self) -> None:
        """A begin whose reply was lost may have taken the claim: hand the element back and drop the claim."""
        if self._orphan is not None:
            delivery, job_id = self._orphan
            self.queue.hand_back(delivery, job_id)
            self._orphan = None

    # -- pieces --------------------------------------------------------------------------------
    def _store(self, job: Job, result: Result) -> list[dict[str, Any]]:
        assets = []
        for index, output in enumerate(result.outputs):
            path = object_path(job.user_id, job.id, output.name)
            self.storage.upload(path, output.data, output.content_type)
            asset = {"type": output.kind, "url": path, "thumbnail_url": None,
                     "metadata": {"asset_index": index, **output.metadata, "file_size_bytes": len(output.data)}}
            if output.thumbnail is not None:
                thumb = object_path(job.user_id, job.id, f"{PurePosixPath(output.name).stem}.thumb.webp")
                self.storage.upload(thumb, output.thumbnail, "image/webp")
                asset["thumbnail_url"] = thumb
            assets.append(asset)
        return assets

    def _progress(self, fraction: float, message: str = "") -> None:
        """The handler's progress report, and its one cooperative cancellation point (the deadline, the app's
        cancellation: ``CancelWatch.poll`` never waits for the network)."""
        deadline = self.deadline
        if deadline is not None and self.clock() >= deadline:
            raise JobCancelled("the job ran past its deadline")
        watch = self._watch
        if watch is not None:
            watch.poll()
        try:
            self.progress_state = {"fraction": round(max(0.0, min(1.0, float(fraction))), 3), "message": message}
        except (TypeError, ValueError):
            pass

    def hand_back_current(self, count_attempt: bool = False) -> bool:
        """Cold stop, watchdog: return the running job to the head of its queue (the attempt stays counted
        only if asked; one this worker did not count is never undone). Nothing to return once the job is past
        its terminal step. The job thread's result is then discarded (its claim is gone)."""
        delivery, job, claim = self.current, self.current_job, self._claim
        if delivery is None or self.settling:
            return False
        handed = self.queue.hand_back(delivery, job.id if job else None, claim.token if claim else None,
                                      count_attempt)
        if handed:
            log.warning("handed job %s back to %s", job.id if job else "unknown", self.queue.queue)
        return handed

"""The one job loop (DESIGN "one extension point per axis"). It never branches on model kind.

Recipe for each element: fetch → decode (undecodable → dead list) → skip if already done → count the
attempt (past the limit → dead list + ``failed``) → ``processing`` callback → ``handler.run`` → upload →
terminal callback → ack. Typed errors decide: ``InvalidJob``/``WorkerError`` fail the job now,
``RetryableError`` and unexpected exceptions hand it back until the attempt limit.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import PurePosixPath
from typing import Any, Callable

from . import callbacks as cb
from .callbacks import CallbackClient, Outcome
from .errors import ErrorType, InvalidJob, RetryableError, WorkerError
from .handler import Handler, Result
from .job import Job, decode
from .metrics import Metrics
from .queue import Delivery, ReliableQueue
from .storage import Storage, object_path
from .transport import TransportError

log = logging.getLogger(__name__)

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
APP_OWNED_KEYS = frozenset({"destination", "scene_id", "character_id", "conversation_id", "project_id",
                            "user_id", "job_id", "status", "credits", "cost"})


class Runner:
    def __init__(self, handler: Handler, queue: ReliableQueue, callbacks: CallbackClient, storage: Storage,
                 metrics: Metrics, worker_id: str, max_attempts: int = 3,
                 gpu_lock: threading.Lock | None = None, before_job: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, *,
                 trip: Callable[..., None] = lambda code, reason: log.error("trip %s: %s", code, reason)):
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
        self.current: Delivery | None = None
        self.current_job: Job | None = None
        self.progress_state: dict[str, Any] = {}
        self.jobs_done = 0
        self._orphaned = False
        # Read by the service (workers/core/service.py): its trip callback (breaker / FatalWorkerError), the
        # watchdog's deadline (monotonic, None when no job runs), the claim its heartbeat renews ((job id,
        # token) or None), and `settling` (True from the terminal step until the job leaves: a cold stop waits
        # for it instead of handing the job back).
        self.trip = trip
        self.deadline: float | None = None
        self.claim: tuple[str, str] | None = None
        self.settling = False

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                if failures or self._orphaned:
                    # Idle after a Redis outage: whatever is still in our processing list (a job taken just
                    # before the outage, a move whose reply was lost) goes back to the head of its queue.
                    self.queue.recover_own()
                    self._orphaned = False
                delivery = self.queue.fetch()
                failures = 0
            except TransportError as exc:
                failures += 1
                log.warning("queue unavailable (%s); retrying", exc)
                stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if delivery is not None:
                self.process(delivery)

    def process(self, delivery: Delivery) -> None:
        self.current, started = delivery, self.clock()
        try:
            self._process(delivery, started)
        except TransportError as exc:
            # Only before the job ran (acks retry until Redis answers): the element stays in our processing
            # list and `run` returns it to the queue once Redis answers again. Nothing is lost.
            log.error("queue unavailable before the job ran (%s); it will be returned to the queue", exc)
            self._orphaned = True
        finally:
            self.current, self.current_job, self.progress_state = None, None, {}
            self.settling = False

    def _process(self, delivery: Delivery, started: float) -> None:
        try:
            job = decode(delivery.raw)
            if job.queue.value != self.queue.queue:
                raise InvalidJob(f"job type {job.type.value} belongs to {job.queue.value}, not {self.queue.queue}",
                                 job.id)
        except InvalidJob as exc:
            if exc.job_id is None:
                self.queue.dead_letter(delivery, f"undecodable: {exc.message}", None)
                self.metrics.jobs.labels("unknown", "dead").inc()
                return
            return self._finish(delivery, exc.job_id, None, self._failed_body(exc.job_id, None, exc), "invalid")
        self.current_job = job
        if self.queue.already_done(job.id):
            log.info("job %s already reached its terminal state; dropping the duplicate", job.id)
            self.queue.finish(delivery, None)
            return
        attempt = self.queue.count_attempt(job.id)
        if attempt > self.max_attempts:
            error = WorkerError(f"job failed {self.max_attempts} times; giving up", ErrorType.INTERNAL_ERROR)
            return self._dead(delivery, job, error, f"attempt limit ({self.max_attempts}) reached")
        self.callbacks.progress(cb.encode(job.id, self.worker_id, "processing",
                                          metadata={"job_type": job.type.value, "worker_id": self.worker_id,
                                                    "attempt": attempt}))
        try:
            self.before_job()
            with self.gpu_lock:
                result = self.handler.run(job, self._progress)
            assets = self._store(job, result)
        except Exception as exc:  # typed below: WorkerError subclasses decide, anything else retries
            return self._on_error(delivery, job, exc, attempt)
        metadata = self._job_metadata(job, result.metadata, started)
        body = cb.encode(job.id, self.worker_id, "completed", assets, None, metadata)
        self._finish(delivery, job.id, job, body, "completed", started)

    # -- outcomes ------------------------------------------------------------------------------
    def _on_error(self, delivery: Delivery, job: Job, exc: Exception, attempt: int) -> None:
        retry = isinstance(exc, RetryableError) or not isinstance(exc, WorkerError)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            # Any handler's temporary files (e.g. the MP4 encoder's): say so clearly; no path in the message.
            log.error("job %s (%s): the worker's disk is full: %s", job.id, job.type.value, exc)
            exc = WorkerError(f"no space left on the worker's disk for temporary files ({os.strerror(exc.errno)})",
                              ErrorType.INTERNAL_ERROR)
        elif not isinstance(exc, WorkerError):
            log.exception("job %s (%s) raised an unexpected error", job.id, job.type.value)
            exc = WorkerError("internal error while running the job", ErrorType.INTERNAL_ERROR)
        else:
            log.warning("job %s (%s) failed: %s %s", job.id, job.type.value, exc.error_type.value, exc.message)
        if not retry:
            return self._finish(delivery, job.id, job, self._failed_body(job.id, job, exc), "failed")
        if attempt >= self.max_attempts:
            return self._dead(delivery, job, exc, f"{exc.error_type.value} on the last attempt")
        delay = getattr(exc, "delay", 0.0)
        if delay:
            time.sleep(min(delay, 30.0))
        self._until_acknowledged(lambda: self.queue.hand_back(delivery, job.id, count_attempt=True))
        self.metrics.jobs.labels(job.type.value, "retried").inc()

    def _dead(self, delivery: Delivery, job: Job, error: WorkerError, reason: str) -> None:
        self.settling = True
        self._until_acknowledged(lambda: self.queue.dead_letter(delivery, reason, job.id))
        body = self._failed_body(job.id, job, error)
        if self.callbacks.deliver(body) is Outcome.FAILED:
            self._until_acknowledged(lambda: self.queue.record_callback(job.id, body))
        self.metrics.jobs.labels(job.type.value, "dead").inc()

    def _finish(self, delivery: Delivery, job_id: str, job: Job | None, body: bytes, outcome: str,
                started: float | None = None) -> None:
        self.settling = True
        delivered = self.callbacks.deliver(body)
        if delivered is Outcome.FAILED:
            log.error("callback for job %s not delivered; kept in the outbox", job_id)
            self._until_acknowledged(lambda: self.queue.finish_to_outbox(delivery, job_id, body))
        else:
            self._until_acknowledged(lambda: self.queue.finish(delivery, job_id))
        job_type = job.type.value if job else "unknown"
        self.metrics.jobs.labels(job_type, outcome).inc()
        if started is not None:
            self.metrics.job_seconds.labels(job_type).observe(self.clock() - started)
        self.jobs_done += 1

    def _until_acknowledged(self, step: Callable[[], Any]) -> None:
        """Leave the processing list even across a Redis outage: once the terminal callback is out, a lost
        ack would run the job again (a second callback). Retry with backoff until Redis answers."""
        delay = 0.5
        while True:
            try:
                step()
                return
            except TransportError as exc:
                log.warning("queue unavailable for an acknowledgement (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

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

    def _job_metadata(self, job: Job, metadata: dict[str, Any], started: float) -> dict[str, Any]:
        clean = {k: v for k, v in metadata.items() if k not in APP_OWNED_KEYS}
        return {**clean, "job_type": job.type.value, "worker_id": self.worker_id,
                "processing_time": round(self.clock() - started, 3)}

    def _failed_body(self, job_id: str, job: Job | None, error: WorkerError) -> bytes:
        metadata = {"job_type": job.type.value if job else None, "error_type": error.error_type.value,
                    "retryable": error.retryable, "worker_id": self.worker_id}
        return cb.encode(job_id, self.worker_id, "failed", [], error.message, metadata)

    def _progress(self, fraction: float, message: str = "") -> None:
        try:
            self.progress_state = {"fraction": round(max(0.0, min(1.0, float(fraction))), 3), "message": message}
        except (TypeError, ValueError):
            pass

    def hand_back_current(self, count_attempt: bool = False) -> bool:
        """Cold stop: return the job being run to the head of its queue (the attempt counts only if asked)."""
        delivery, job = self.current, self.current_job
        if delivery is None:
            return False
        self.queue.hand_back(delivery, job.id if job else None, count_attempt=count_attempt)
        log.warning("handed job %s back to %s", job.id if job else "unknown", self.queue.queue)
        return True

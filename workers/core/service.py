"""One worker process: a handler (model family), its job loop threads and its HTTP app.

``Service`` loads the models in the background (``/health`` is 503 until then), then runs the queue threads
(job loop, heartbeat + reaper + claim renewal, outbox sender, job watchdog) and serves the common routes.

Stopping, in the only safe order (review #2, #17): first the job loop stops taking jobs, then the service waits
for the loop thread itself to end (it leaves its blocking move within ``QUEUE_POLL_MAX_SECONDS``, or finishes the
job it took), and only then, holding nothing, retires its liveness keys. Three ways out:

- warm (SIGTERM): finish the current job within the grace, else a cold stop;
- cold (SIGINT/SIGQUIT, the grace expired): a job past its terminal step finishes delivering its callback
  (bounded by ``WORKER_COLD_STOP_SETTLE_SECONDS``), any other job goes back to the head of its queue uncounted;
- tripped (the runner's circuit breaker, ``FatalWorkerError``, the watchdog): ``/health`` 503 with the reason,
  no more jobs, the process exits with a named code (``common.exit_codes``) so the orchestrator restarts it.
"""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from flask import Blueprint, Flask, jsonify

from common import openapi
from common.errors import ConfigError
from common.exit_codes import ExitCode
from common.http import ApiError, create_base_app, require_admin
from common.settings import Settings
from workers.core.errors import WorkerError
from workers.core.memory_client import MemoryClient

from . import storage as storage_mod
from . import transport as transport_mod
from .callbacks import CallbackClient, OutboxSender
from .control_http import control_error, which_argument
from .handler import Handler, ModelControl, WorkerHandler
from .introspect import device_memory, versions
from .metrics import Metrics
from .queue import ReliableQueue
from .residency import Residency
from .runner import CancelChecks, JobTimeouts, Runner
from .state import Lifecycle, WorkerState
from .transport import TransportError
from .watchdog import Watchdog

log = logging.getLogger(__name__)

TRIP_LINGER_SECONDS = 1.0   # a tripped worker answers /health 503 with its reason this long before it exits

Routes = Callable[[Residency], Blueprint]
"""A kind's own HTTP routes (``create_routes(handler, residency)`` beside its ``create_handler``, bound to the
handler), mounted on the worker's app; ``residency`` is how a generating route reloads an evicted model."""


def default_worker_id(settings: Settings, kind: str, slot: int) -> str:
    """A fresh id for every process: ``<WORKER_ID or RUNPOD_POD_ID or hostname>-<kind>-<slot>-<6 hex>``.

    The random part is what makes the id safe (review #6): a pod-wide ``WORKER_ID``, a second pod from the
    same template or a restarted process never shares a heartbeat or a processing list with a live worker.
    A dead predecessor's list is returned by the reaper of any live worker, not adopted by its successor."""
    prefix = settings.worker_id or settings.runpod_pod_id or socket.gethostname()
    return f"{prefix}-{kind}-{slot}-{secrets.token_hex(3)}"


class Service:
    def __init__(self, settings: Settings, handler: WorkerHandler, worker_id: str, metrics: Metrics | None = None,
                 *, exit_process: Callable[[int], NoReturn], routes: Routes | None = None):
        self.settings = settings
        self.handler: Handler = handler
        self.control: ModelControl = handler
        self.worker_id = worker_id
        self.metrics = metrics or Metrics()
        self.metrics.include(handler)   # a kind's own collectors (the chat engine's)
        self.exit_process = exit_process   # ends the process with a code the orchestrator sees (__main__)
        self.routes = routes
        self.lifecycle = Lifecycle()
        self.stop_event = self.lifecycle.stopped   # set by the lifecycle only: the job loop takes no more jobs
        self.runner: Runner | None = None
        self.queue: ReliableQueue | None = None
        self.memory = MemoryClient.from_settings(settings, worker=handler.kind)
        self.residency = Residency(handler, self.memory, self.lifecycle, handler.kind)
        self.gpu_lock = self.residency.gpu_lock
        self._job_loop: threading.Thread | None = None
        self._liveness_thread: threading.Thread | None = None
        self._retired = threading.Event()   # set: the heartbeat and the watchdog end
        self._retire_lock = threading.RLock()   # RLock: a signal handler may re-enter on the same thread
        self._stopper: threading.Thread | None = None
        self._stop_lock = threading.RLock()
        self._cold = False   # a cold stop ran: the exit that follows it waits for nothing
        self._cold_stopper: threading.Thread | None = None
        self.started_at = time.time()

    @property
    def busy(self) -> bool:
        return self.runner is not None and self.runner.current is not None

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._setup_then_consume, "setup")

    def _setup_then_consume(self) -> None:
        """Load, then start the queue threads. A bad setting or a failed load ends the process with its code:
        restarting cannot help (``CONFIG_ERROR``, ``BOOT_FAILED``: the orchestrator goes FATAL at once)."""
        try:
            self._setup()
        except ConfigError as exc:
            log.error("%s: configuration error: %s", self.handler.kind, exc)
            self.lifecycle.move(WorkerState.SETUP_FAILED, "configuration error (see the worker log)")
            self.exit_process(ExitCode.CONFIG_ERROR)
        except Exception:   # FatalWorkerError and anything else: the models did not load
            log.exception("%s: model setup failed", self.handler.kind)
            self.lifecycle.move(WorkerState.SETUP_FAILED, "model setup failed (see the worker log)")
            self.exit_process(ExitCode.BOOT_FAILED)

    def _setup(self) -> None:
        began = time.monotonic()
        self._reserve_until_granted()
        if self.stop_event.is_set():
            return
        self.handler.setup()
        log.info("%s ready in %.1f s", self.handler.kind, time.monotonic() - began)
        if not self.lifecycle.move(WorkerState.READY):   # stopped while loading: take no job at all
            return
        if not self.settings.redis_configured:
            log.warning("no queue configured (REDIS_URL / UPSTASH_REDIS_REST_*): serving HTTP only")
            return
        s, transport = self.settings, transport_mod.from_settings(self.settings)
        self.queue = ReliableQueue(transport=transport, queue=self.handler.queue.value, worker_id=self.worker_id,
                                   side=s.queue_pop_side, heartbeat_ttl=s.heartbeat_ttl_seconds,
                                   poll_min=s.poll_min_seconds, poll_max=s.poll_max_seconds)
        callbacks = CallbackClient.from_settings(s, self.metrics)
        self.runner = Runner(handler=self.handler, queue=self.queue, callbacks=callbacks, metrics=self.metrics,
                             storage=storage_mod.from_settings(s, self.metrics), worker_id=self.worker_id,
                             gpu_lock=self.gpu_lock, max_attempts=s.max_attempts,
                             before_job=self._reload_if_unloaded, trip=self.trip,
                             breaker_threshold=s.worker_breaker_threshold,
                             breaker_pause=s.worker_breaker_pause_seconds, timeouts=JobTimeouts.from_settings(s),
                             cancel=CancelChecks.from_settings(s))
        self._first_heartbeat()
        self._liveness_thread = self._spawn(self._liveness, "heartbeat")
        sender = OutboxSender(transport, callbacks, self.metrics, owner=f"{self.worker_id}:outbox")
        self._spawn(lambda: sender.run(self.stop_event, s.outbox_interval_seconds), "outbox")
        watchdog = Watchdog(self.runner, s.job_timeout_grace_seconds, self._overran)
        self._spawn(lambda: watchdog.run(self._retired), "watchdog")
        self._job_loop = self._spawn(lambda: self.runner.run(self.stop_event), "job-loop")

    def _reserve_until_granted(self) -> None:
        """Reserve GPU memory before loading; a manager that is away never blocks the load."""
        while not self.stop_event.is_set():
            grant = self.residency.reserve()
            if grant.may_load:
                self.lifecycle.move(WorkerState.LOADING)
                return
            self.lifecycle.move(WorkerState.WAITING_FOR_MEMORY, f"waiting for GPU memory: {grant.reason}")
            self.stop_event.wait(10.0)

    def _first_heartbeat(self) -> None:
        """Be registered and alive before the first fetch, so a job taken is never in an unknown list."""
        while not self.stop_event.is_set():
            try:
                self.queue.heartbeat()
                return
            except TransportError as exc:
                log.warning("queue unavailable at start (%s); retrying", exc)
                self.stop_event.wait(2.0)

    def _liveness(self) -> None:
        """Heartbeat, claim renewal and reaping, until retired: it outlives ``stop_event`` because a job
        finishing during a warm stop must keep its heartbeat and its claim."""
        while True:
            try:
                self.queue.heartbeat()
                claim = self.runner.claim
                if claim is not None:
                    self.queue.renew_claim(*claim)
                self.queue.reap()
                self.metrics.sample_queue(self.queue.transport, self.queue.queue)
            except TransportError as exc:
                log.warning("heartbeat: %s", exc)
            if self._retired.wait(max(1.0, self.settings.heartbeat_ttl_seconds / 3)):
                return

    def _spawn(self, target: Callable[[], Any], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    # -- stopping ------------------------------------------------------------------------------
    def begin_warm_stop(self, grace: float) -> None:
        """SIGTERM (called from the signal handler, before gunicorn's HTTP drain): stop taking jobs now and
        run the warm stop alongside the drain. Never blocks."""
        self.lifecycle.move(WorkerState.STOPPING)
        with self._stop_lock:
            if self._stopper is None:
                self._stopper = self._spawn(lambda: self.stop_warm(grace), "warm-stop")

    def after_http_drain(self, grace: float) -> None:
        """gunicorn's ``worker_exit``: the HTTP drain is over; the warm stop must be over before the exit."""
        with self._stop_lock:
            stopper = self._stopper
        if self._cold:
            return
        if stopper is None:
            self.stop_warm(grace)
        else:
            stopper.join(grace + 1.0)

    def stop_warm(self, grace: float) -> None:
        """Stop taking jobs and wait up to ``grace`` s for the loop to end (its current job done); else cold."""
        self.lifecycle.move(WorkerState.STOPPING)
        if self._loop_ended(grace):
            self._retire()
        else:
            self.stop_cold()

    def stop_cold(self) -> None:
        """Hand the current job back now (uncounted) and exit ``HANDED_BACK``; with no job, retire and return.

        The work runs on a thread of its own and the signal handler waits for it: a second signal (the
        orchestrator's SIGINT to the group is followed by the arbiter's SIGQUIT) runs its handler *inside* the
        first one on the main thread, and gunicorn ends that handler with ``sys.exit(0)``, which would cut the
        first stop short between its hand-back and its exit. Every handler joins the same stop instead."""
        self._cold = True
        self.lifecycle.move(WorkerState.STOPPING)
        with self._stop_lock:
            if self._cold_stopper is None:
                self._cold_stopper = self._spawn(self._cold_stop, "cold-stop")
            stopper = self._cold_stopper
        stopper.join()

    def _cold_stop(self) -> None:
        self._loop_ended(self.settings.poll_max_seconds + 1.0, or_busy=True)   # a move in flight has landed
        if self._hand_back(count_attempt=False):
            self._retire()
            self.exit_process(ExitCode.HANDED_BACK)
        if self._loop_ended(self.settings.poll_max_seconds + 1.0):
            self._retire()
        # else the loop is stuck in a Redis call: no retire, so the reaper returns whatever it may hold

    def trip(self, code: ExitCode, reason: str) -> None:
        """The runner's escalation (breaker open, ``FatalWorkerError``): it already handed its job back."""
        self._escalate(code, reason, hand_back=False)

    def _overran(self, job_id: str) -> None:
        """The watchdog: the job ignored its cancellation past the grace; it goes back counted (a job that
        always wedges reaches the dead list instead of cycling through restarts)."""
        self._escalate(ExitCode.WATCHDOG, f"job {job_id} overran its deadline", hand_back=True)

    def _escalate(self, code: ExitCode, reason: str, hand_back: bool) -> None:
        if not self.lifecycle.move(WorkerState.TRIPPED, reason):   # tripped once; the first reason stands
            return
        log.error("%s: %s; stopping with %s", self.handler.kind, reason, code.name)
        self._spawn(lambda: self._exit_tripped(code, hand_back), "trip")

    def _exit_tripped(self, code: ExitCode, hand_back: bool) -> NoReturn:
        time.sleep(TRIP_LINGER_SECONDS)
        if hand_back:
            self._hand_back(count_attempt=True)   # the wedged job thread is left where it is: we exit
        elif not self._loop_ended(self.settings.poll_max_seconds + 1.0):
            log.warning("the job loop did not end; the reaper will return anything it holds")
        self._retire()
        self.exit_process(code)

    def _loop_ended(self, timeout: float, or_busy: bool = False) -> bool:
        """Wait up to ``timeout`` s for the job loop thread to end (with ``or_busy``: or to hold a job)."""
        deadline = time.monotonic() + timeout
        while self._job_loop is not None and self._job_loop.is_alive():
            if (or_busy and self.busy) or time.monotonic() >= deadline:
                return False
            self._job_loop.join(0.02)
        return True

    def _hand_back(self, count_attempt: bool) -> bool:
        """Give the current job back to its queue, unless it is past its terminal step: then wait (bounded)
        for its callback delivery to finish instead (the element is already gone; exiting mid-delivery would
        leave the app's callback to be sent a second time by an outbox sender). True if one was handed back."""
        if self.runner is None:
            return False
        deadline = time.monotonic() + self.settings.cold_stop_settle_seconds
        while self.runner.settling and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.runner.current is None or self.runner.settling:
            return False
        try:
            return self.runner.hand_back_current(count_attempt=count_attempt)
        except TransportError as exc:
            log.error("could not hand the job back (%s); the reaper will return it", exc)
            return True

    def _retire(self) -> None:
        """Once the loop holds nothing: end the heartbeat, then drop the liveness keys (once)."""
        with self._retire_lock:
            if self._retired.is_set():
                return
            self._retired.set()
            if self._liveness_thread is not None:
                self._liveness_thread.join(self.settings.redis_timeout_seconds)
            if self.queue is None:
                return
            try:
                self.queue.retire()
            except TransportError as exc:
                log.warning("could not retire (%s); the heartbeat expires and the reaper cleans up", exc)

    def _reload_if_unloaded(self) -> None:
        self.residency.reload_if_unloaded()

    # -- HTTP ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """200 only when ready to take jobs; ``state`` says what the worker is doing, ``error`` why not."""
        state, error = self.lifecycle.reported(self.busy)
        details = {"kind": self.handler.kind, "worker_id": self.worker_id, "state": state.value, "busy": self.busy,
                   "queue": self.handler.queue.value,
                   "consuming": self.runner is not None and not self.stop_event.is_set(),
                   "jobs_done": self.runner.jobs_done if self.runner else 0}
        if error:
            details["error"] = error
        return state.serving, details

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Liveness, apart from readiness: alive while loading, busy or stopping; dead only when the job loop or
        the heartbeat thread ended while the worker was still meant to consume (an exception escaped it). No
        job is taken any more then, and only a restart helps: the orchestrator restarts on this route alone."""
        ended = [t.name for t in (self._job_loop, self._liveness_thread) if t is not None and not t.is_alive()]
        if ended and not self.stop_event.is_set() and not (self.runner is not None and self.runner.stopped):
            return False, {"error": f"thread(s) ended: {', '.join(ended)}"}
        return True, {"state": self.lifecycle.reported(self.busy)[0].value}

    def create_app(self) -> Flask:
        app = create_base_app(f"{self.handler.kind}-worker", self.health, self.metrics, live=self.live)
        admin = require_admin(lambda: self.settings.worker_admin_key)

        @app.get("/status")
        def status():
            ready, details = self.health()
            return jsonify({"ready": ready, **details, "uptime_s": round(time.time() - self.started_at, 1),
                            "progress": self.runner.progress_state if self.runner else {},
                            "model": self._handler_status()})

        @app.get("/memory/status")
        def memory_status():
            return jsonify({"success": True, "device": device_memory(), "models": self._handler_status(),
                            "busy": self.busy,  # memory_manager: what a restarted manager re-derives its ledger from
                            "memory_manager": self.residency.describe()})

        @app.post("/memory/unload")
        @admin
        def memory_unload():
            which = which_argument()
            if not self.gpu_lock.acquire(timeout=2.0):
                raise ApiError(409, "a job is running; try again when the worker is idle")
            try:
                message = self.residency.unload(which)
            except WorkerError as exc:
                raise control_error(exc) from None
            finally:
                self.gpu_lock.release()
            return jsonify({"success": True, "message": message})

        @app.post("/memory/load")
        @admin
        def memory_load():
            which = which_argument()
            with self.gpu_lock:
                try:
                    message = self.residency.load(which)
                except WorkerError as exc:
                    raise control_error(exc) from None
            return jsonify({"success": True, "message": message})

        @app.get("/debug/env")
        @admin
        def debug_env():
            return jsonify({"success": True, "versions": versions(), "device": device_memory(),
                            "settings_set": self.settings.is_set()})

        if self.routes is not None:
            app.register_blueprint(self.routes(self.residency))
        openapi.serve(app, lambda: openapi.worker_document(self.handler.kind))
        return app

    def _handler_status(self) -> dict[str, Any]:
        try:
            return self.control.status()
        except Exception:
            log.exception("handler status failed")
            return {"error": "status unavailable"}

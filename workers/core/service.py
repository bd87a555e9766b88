"""One worker process: a handler (model family), its job loop threads and its HTTP app.

``Service`` loads the models in the background (``/health`` is 503 until then), then runs the queue threads
(job loop, heartbeat + reaper, outbox sender) and serves the common routes. Two stop levels: warm (finish the
current job, then exit) and cold (hand the current job back to its queue, then exit).
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import threading
import time
from typing import Any

from flask import Flask, jsonify, request

from . import openapi
from . import storage as storage_mod
from . import transport as transport_mod
from memory_manager.client import MemoryClient, ReserveResult

from .callbacks import CallbackClient, OutboxSender
from .errors import ErrorType, InvalidJob, RetryableError, WorkerError
from .handler import Handler
from .http import ApiError, create_base_app, json_body, require_admin
from .metrics import Metrics
from .queue import ReliableQueue
from .runner import Runner
from .settings import Settings
from .transport import TransportError

log = logging.getLogger(__name__)

EXIT_BOOT_FAILED = 3   # gunicorn's WORKER_BOOT_ERROR: the arbiter halts instead of respawning forever
EXIT_HANDED_BACK = 75  # cold stop: the current job went back to its queue


def default_worker_id(settings: Settings, kind: str, slot: int) -> str:
    if settings.worker_id:
        return settings.worker_id
    host = settings.runpod_pod_id or socket.gethostname()
    return f"{host}-{kind}-{slot}"


class Service:
    def __init__(self, settings: Settings, handler: Handler, worker_id: str, metrics: Metrics | None = None):
        self.settings = settings
        self.handler = handler
        self.worker_id = worker_id
        self.metrics = metrics or Metrics()
        self.ready = threading.Event()
        self.setup_error: str | None = None
        self.stop_event = threading.Event()
        self.gpu_lock = threading.Lock()
        self.unloaded = False
        self.runner: Runner | None = None
        self.queue: ReliableQueue | None = None
        self.memory = MemoryClient.from_settings(settings, worker=handler.kind)
        self.reservation: ReserveResult | None = None
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()

    @property
    def busy(self) -> bool:
        return self.runner is not None and self.runner.current is not None

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._setup_then_consume, "setup")

    def _setup_then_consume(self) -> None:
        began = time.monotonic()
        self._reserve_until_granted()
        if self.stop_event.is_set():
            return
        try:
            self.handler.setup()
        except Exception:
            log.exception("%s: model setup failed", self.handler.kind)
            self.setup_error = "model setup failed (see the worker log)"
            os._exit(EXIT_BOOT_FAILED)
        log.info("%s ready in %.1f s", self.handler.kind, time.monotonic() - began)
        self.ready.set()
        if not self.settings.redis_configured:
            log.warning("no queue configured (REDIS_URL / UPSTASH_REDIS_REST_*): serving HTTP only")
            return
        transport = transport_mod.from_settings(self.settings)
        s = self.settings
        self.queue = ReliableQueue(transport, self.handler.queue.value, self.worker_id, s.queue_pop_side,
                                   s.heartbeat_ttl_seconds, s.poll_min_seconds, s.poll_max_seconds)
        callbacks = CallbackClient.from_settings(s, self.metrics)
        self.runner = Runner(self.handler, self.queue, callbacks, storage_mod.from_settings(s), self.metrics,
                             self.worker_id, s.max_attempts, self.gpu_lock, self._reload_if_unloaded)
        self._recover()
        self._spawn(self._liveness, "heartbeat")
        self._spawn(lambda: OutboxSender(transport, callbacks, self.metrics).run(self.stop_event), "outbox")
        self._spawn(lambda: self.runner.run(self.stop_event), "job-loop")

    def _reserve_until_granted(self) -> None:
        """Reserve GPU memory before loading; a manager that is away never blocks the load."""
        while not self.stop_event.is_set():
            self.reservation = self.memory.reserve()
            if self.reservation.may_load:
                return
            self.setup_error = f"waiting for GPU memory: {self.reservation.reason}"
            self.stop_event.wait(10.0)
        self.setup_error = None

    def _recover(self) -> None:
        """Before the first fetch: a previous life of this worker id may have died holding a job."""
        while not self.stop_event.is_set():
            try:
                self.queue.heartbeat()
                self.queue.recover_own()
                return
            except TransportError as exc:
                log.warning("queue unavailable at start (%s); retrying", exc)
                self.stop_event.wait(2.0)

    def _liveness(self) -> None:
        while True:
            try:
                self.queue.heartbeat()
                self.queue.reap()
                self.metrics.queue_depth.labels(self.queue.queue).set(self.queue.depth())
            except TransportError as exc:
                log.warning("heartbeat: %s", exc)
            if self.stop_event.wait(max(1.0, self.settings.heartbeat_ttl_seconds / 3)) and not self.busy:
                break

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop_warm(self, grace: float) -> bool:
        """Stop taking jobs and wait up to ``grace`` s for the current one; hand it back if it is not done."""
        self.stop_event.set()
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.busy:
            return self.stop_cold()
        if self.queue is not None:
            try:
                self.queue.retire()
            except TransportError:
                pass
        return True

    def stop_cold(self) -> bool:
        self.stop_event.set()
        if self.runner is not None and self.runner.current is not None:
            try:
                self.runner.hand_back_current()
            except TransportError as exc:
                log.error("could not hand the job back (%s); the reaper will return it", exc)
            os._exit(EXIT_HANDED_BACK)
        return True

    def _reload_if_unloaded(self) -> None:
        if self.unloaded:
            self._load("all")

    def _load(self, which: str) -> str:
        """Reserve, then load; a refusal is a retryable ``WORKER_UNAVAILABLE`` (HTTP 409 on /memory/load)."""
        if self.reservation is None or self.reservation.id is None:
            self.reservation = self.memory.reserve()
            if not self.reservation.may_load:
                raise RetryableError(f"no GPU memory for {self.handler.kind}: {self.reservation.reason}",
                                     ErrorType.WORKER_UNAVAILABLE, delay=5.0)
        message = self.handler.load(which)
        self.unloaded = False
        return message

    def _unload(self, which: str) -> str:
        message = self.handler.unload(which)
        if which == "all":
            self.unloaded = True
            self.memory.release(self.reservation)
            self.reservation = None
        return message

    # -- HTTP ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        details = {"kind": self.handler.kind, "worker_id": self.worker_id, "busy": self.busy,
                   "queue": self.handler.queue.value,
                   "consuming": self.runner is not None and not self.stop_event.is_set(),
                   "jobs_done": self.runner.jobs_done if self.runner else 0}
        if self.setup_error:
            details["error"] = self.setup_error
        elif not self.ready.is_set():
            details["state"] = "loading"
        return self.ready.is_set() and not self.stop_event.is_set(), details

    def create_app(self) -> Flask:
        app = create_base_app(f"{self.handler.kind}-worker", self.health, self.metrics)
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
                            "memory_manager": self.memory.describe(self.reservation, self.unloaded)})

        @app.post("/memory/unload")
        @admin
        def memory_unload():
            which = _which()
            if not self.gpu_lock.acquire(timeout=2.0):
                raise ApiError(409, "a job is running; try again when the worker is idle")
            try:
                message = self._unload(which)
            except WorkerError as exc:
                raise _control_error(exc) from None
            finally:
                self.gpu_lock.release()
            return jsonify({"success": True, "message": message})

        @app.post("/memory/load")
        @admin
        def memory_load():
            which = _which()
            with self.gpu_lock:
                try:
                    message = self._load(which)
                except WorkerError as exc:
                    raise _control_error(exc) from None
            return jsonify({"success": True, "message": message})

        @app.get("/debug/env")
        @admin
        def debug_env():
            return jsonify({"success": True, "versions": versions(), "device": device_memory(),
                            "settings_set": self.settings.is_set()})

        self.handler.register_routes(app, self)
        openapi.serve(app, lambda: openapi.worker_document(self.handler.kind))
        return app

    def _handler_status(self) -> dict[str, Any]:
        try:
            return self.handler.status()
        except Exception:
            log.exception("handler status failed")
            return {"error": "status unavailable"}


def _control_error(exc: WorkerError) -> ApiError:
    """A handler's typed error on /memory/load|unload: bad ``which`` 400, no memory now 409, else 503."""
    if isinstance(exc, InvalidJob):
        return ApiError(400, exc.message)
    if isinstance(exc, RetryableError):
        return ApiError(409, exc.message)
    return ApiError(503, exc.message)


def _which() -> str:
    """``which`` from the query string, else the JSON body; absent (or null / "") means ``all``. A value of
    another type is a 400, never read as ``all`` (``{"which": []}`` must not unload everything)."""
    which = request.args.get("which")
    if which is None:
        which = json_body(optional=True).get("which")
    if which is None or which == "":
        return "all"
    if not isinstance(which, str):
        raise ApiError(400, "'which' must be a string")
    return which


def device_memory() -> dict[str, Any]:
    try:
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return {"type": "cuda", "name": torch.cuda.get_device_name(), "total_gb": round(total / 2**30, 2),
                    "free_gb": round(free / 2**30, 2),
                    "allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 2)}
    except Exception:  # a broken CUDA runtime must not break the status route
        log.exception("CUDA memory query failed")
    return {"type": "cpu"}


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    try:
        import torch
        found["cuda"] = torch.version.cuda
    except ImportError:
        found["cuda"] = None
    return found

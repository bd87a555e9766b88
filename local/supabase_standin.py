"""A local Supabase stand-in: the ``job-callback`` function, Storage uploads, worker registration and the
``jobs`` table's status over the REST API (``GET /rest/v1/jobs``, local/supabase_jobs.py).

It checks what the real gateway and functions check (service key in ``Authorization`` and ``apikey``,
the HMAC ``X-Callback-Signature`` over the exact body bytes, Storage's content-type and upsert rules)
and records what it received, with controls to inject failures (``fail_next``, ``fail_storage_next``,
``set_storage_failing`` for a storage outage window, ``set_down``, ``delay``, ``skip_job_ids``; the jobs
table's ``set_job_status`` and ``jobs_table.set_failing`` / ``set_hanging``). It only ever
contacts loopback addresses (the registration health check).

CLI for the demo, printing each callback as one JSON line on stdout::

    python -m local.supabase_standin --port 54321 --service-key K --callback-secret S
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Flask, Response, request

from local.net import BackgroundServer
from local.supabase_jobs import ENDPOINT as JOBS_ENDPOINT
from local.supabase_jobs import JobsTable, add_jobs_route

HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ReceivedCallback:
    """One accepted ``job-callback`` request: parsed body, exact raw bytes, headers (lower-case names),
    arrival time (``time.time()``), and whether it was answered as skipped."""

    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]
    at: float
    skipped: bool = False

    @property
    def job_id(self) -> str | None:
        return self.body.get("job_id")

    @property
    def status(self) -> str | None:
        return self.body.get("status")


@dataclass(frozen=True)
class Registration:
    """One registration call (``register-chat-worker`` or ``update-worker-url``) and how it was answered."""

    function: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    accepted: bool
    error: str | None = None


def sign(body: bytes, secret: str) -> str:
    """The ``X-Callback-Signature`` value for ``body``: ``sha256=<lowercase hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is http(s) to a literal loopback address or ``localhost``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


@dataclass
class StandinState:
    """What the stand-in has received, and the failure controls. Thread-safe."""

    service_key: str
    callback_secret: str
    health_check: bool = True
    delay: float = 0.0
    skip_job_ids: set[str] = field(default_factory=set)
    on_callback: Callable[[ReceivedCallback], None] | None = None
    jobs_table: JobsTable = field(default_factory=JobsTable)
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _callbacks: list[ReceivedCallback] = field(default_factory=list, repr=False)
    _registrations: list[Registration] = field(default_factory=list, repr=False)
    _objects: dict[str, tuple[bytes, str]] = field(default_factory=dict, repr=False)
    _fail_callbacks: list[int] = field(default_factory=list, repr=False)
    _fail_storage: list[int] = field(default_factory=list, repr=False)
    _down: bool = False
    _storage_failing: int | None = None
    callback_attempts: int = 0
    storage_attempts: int = 0
    storage_refused: int = 0

    # ------------------------------------------------------------- controls
    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` callback requests with ``status``, recording nothing."""
        with self._lock:
            self._fail_callbacks.extend([status] * n)

    def fail_storage_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` storage uploads with ``status``, storing nothing."""
        with self._lock:
            self._fail_storage.extend([status] * n)

    def set_storage_failing(self, status: int | None) -> None:
        """While ``status`` is set, every storage upload is answered with it (an outage window of Supabase
        Storage alone); ``None`` ends the window."""
        with self._lock:
            self._storage_failing = status

    def set_job_status(self, job_id: str, status: str | None) -> None:
        """The app's ``jobs`` row of ``job_id`` now says ``status`` (e.g. ``"cancelled"``; ``None``: no row)."""
        self.jobs_table.set_status(job_id, status)

    def set_down(self, down: bool) -> None:
        """While down, every request is answered 503."""
        self._down = down

    # ------------------------------------------------------------- accessors
    @property
    def objects(self) -> dict[str, tuple[bytes, str]]:
        """Stored objects: ``"bucket/path"`` → ``(bytes, content_type)`` (a copy)."""
        with self._lock:
            return dict(self._objects)

    @property
    def registrations(self) -> list[Registration]:
        with self._lock:
            return list(self._registrations)

    def callbacks(self, job_id: str | None = None, status: str | None = None) -> list[ReceivedCallback]:
        """Accepted callbacks in arrival order, optionally filtered by job id and/or status."""
        with self._lock:
            return [
                c for c in self._callbacks
                if (job_id is None or c.job_id == job_id) and (status is None or c.status == status)
            ]

    def wait_for(
        self,
        predicate_or_job_id: str | Callable[[ReceivedCallback], bool],
        status: str | None = "completed",
        timeout: float = 30.0,
    ) -> ReceivedCallback:
        """Block until a matching callback has arrived and return it; ``TimeoutError`` otherwise.

        A string matches that job id with ``status`` (``None``: any status); a callable is a predicate.
        """
        if isinstance(predicate_or_job_id, str):
            job_id = predicate_or_job_id

            def match(c: ReceivedCallback) -> bool:
                return c.job_id == job_id and (status is None or c.status == status)
        else:
            match = predicate_or_job_id
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = next((c for c in self._callbacks if match(c)), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(c.job_id, c.status) for c in self._callbacks]
                    raise TimeoutError(f"no matching callback within {timeout}s; received {seen}")
                self._lock.wait(remaining)

    # ------------------------------------------------------------- used by the app
    def _take(self, queue: list[int]) -> int | None:
        with self._lock:
            return queue.pop(0) if queue else None

    def _record_callback(self, cb: ReceivedCallback) -> None:
        with self._lock:
            self._callbacks.append(cb)
            self._lock.notify_all()
        if self.on_callback is not None:
            self.on_callback(cb)


def _headers() -> dict[str, str]:
    """The request's headers with lower-case names (``apikey``, ``x-callback-signature``, …)."""
    return {name.lower(): value for name, value in request.headers.items()}


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def create_app(service_key: str, callback_secret: str, state: StandinState | None = None) -> Flask:
    """Flask app for the stand-in; its :class:`StandinState` is ``app.extensions["supabase_standin"]``."""
    st = state if state is not None else StandinState(service_key, callback_secret)
    app = Flask("supabase_standin")
    app.extensions["supabase_standin"] = st

    @app.before_request
    def gateway() -> Response | None:
        """What happens before a function runs: outages, injected failures, then the key check."""
        if st._down:
            return _json({"error": "service unavailable"}, 503)
        failure = None
        if request.endpoint == "job_callback":
            with st._lock:
                st.callback_attempts += 1
            time.sleep(st.delay)
            failure = st._take(st._fail_callbacks)
        elif request.endpoint == "upload":
            with st._lock:
                st.storage_attempts += 1
                failure = st._storage_failing
            failure = failure if failure is not None else st._take(st._fail_storage)
            if failure is not None:
                with st._lock:
                    st.storage_refused += 1
        elif request.endpoint == JOBS_ENDPOINT:
            failure = st.jobs_table.before_lookup()
        if failure is not None:
            return _json({"statusCode": str(failure), "error": "injected failure"}, failure)
        bearer = request.headers.get("Authorization", "").encode()
        apikey = request.headers.get("apikey", "").encode()
        ok = hmac.compare_digest(bearer, f"Bearer {service_key}".encode())
        ok &= hmac.compare_digest(apikey, service_key.encode())
        return None if ok else _json({"error": "unauthorized", "message": "Invalid API key or JWT"}, 401)

    @app.post("/functions/v1/job-callback")
    def job_callback() -> Response:
        raw = request.get_data()
        given = request.headers.get("X-Callback-Signature", "").encode()
        if not hmac.compare_digest(given, sign(raw, callback_secret).encode()):
            return _json({"error": "invalid signature"}, 401)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _json({"error": "body must be a JSON object"}, 400)
        skipped = body.get("job_id") in st.skip_job_ids
        st._record_callback(ReceivedCallback(body, raw, _headers(), time.time(), skipped))
        return _json({"success": True, "skipped": True} if skipped else {"success": True})

    add_jobs_route(app, st.jobs_table)

    @app.post("/storage/v1/object/<bucket>/<path:path>")
    def upload(bucket: str, path: str) -> Response:
        content_type = (request.mimetype or "").lower()
        if content_type in ("", "application/octet-stream"):
            message = f"mime type {content_type or '(none)'} is not supported"
            return _json({"statusCode": "400", "error": "invalid_mime_type", "message": message}, 400)
        key = f"{bucket}/{path}"
        upsert = request.headers.get("x-upsert", "").lower() == "true"
        with st._lock:
            if key in st._objects and not upsert:
                return _json({"statusCode": "409", "error": "Duplicate", "message": "The resource already exists"}, 409)
            st._objects[key] = (request.get_data(), request.content_type or content_type)
        return _json({"Key": key, "Id": str(uuid.uuid4())})

    @app.get("/storage/v1/object/<bucket>/<path:path>")
    def download(bucket: str, path: str) -> Response:
        found = st.objects.get(f"{bucket}/{path}")
        if found is None:
            return _json({"statusCode": "404", "error": "not_found", "message": "Object not found"}, 404)
        return Response(found[0], mimetype=found[1])

    @app.post("/functions/v1/<any('register-chat-worker', 'update-worker-url'):function>")
    def register(function: str) -> Response:
        body = request.get_json(silent=True)
        body = body if isinstance(body, dict) else {}
        error = _health_error(body.get("worker_url")) if st.health_check else None
        with st._lock:
            st._registrations.append(Registration(function, body, _headers(), time.time(), error is None, error))
        if error is not None:
            return _json({"success": False, "error": error}, 400)
        return _json({"success": True, "worker_url": body.get("worker_url")})

    return app


def _health_error(worker_url: Any) -> str | None:
    """``None`` if ``worker_url + "/health"`` answers 2xx with a body within 5 s; else why not.

    Only loopback URLs are contacted; anything else fails the check without any network traffic.
    """
    if not isinstance(worker_url, str) or not worker_url:
        return "worker_url is required"
    if not is_loopback_url(worker_url):
        return "Worker health check failed: only loopback URLs are checked by the local stand-in"
    try:
        resp = requests.get(worker_url.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        return f"Worker health check failed: {type(exc).__name__}"
    if not (200 <= resp.status_code < 300 and resp.content):
        return f"Worker health check failed: HTTP {resp.status_code}"
    return None


class SupabaseStandin(StandinState):
    """:func:`create_app` served on a free loopback port from a background thread; also the state itself."""

    def __init__(self, service_key: str = "local-service-key", callback_secret: str = "local-callback-secret",
                 port: int = 0, *, health_check: bool = True) -> None:
        super().__init__(service_key, callback_secret, health_check=health_check)
        self.app = create_app(service_key, callback_secret, self)
        self._server = BackgroundServer(self.app, port, name="supabase-standin")
        self.port = self._server.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (what ``SUPABASE_URL`` would hold)."""
        return self._server.url

    def stop(self) -> None:
        self.jobs_table.release()
        self._server.stop()

    def __enter__(self) -> SupabaseStandin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, printing each accepted callback body as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--service-key", default=os.environ.get("SUPABASE_SERVICE_KEY"))
    parser.add_argument("--callback-secret", default=os.environ.get("JOB_CALLBACK_SECRET"))
    args = parser.parse_args(argv)
    if not args.service_key or not args.callback_secret:
        parser.error("--service-key and --callback-secret are required (or SUPABASE_SERVICE_KEY, JOB_CALLBACK_SECRET)")

    def emit(cb: ReceivedCallback) -> None:
        print(json.dumps(cb.body), flush=True)

    standin = SupabaseStandin(args.service_key, args.callback_secret, args.port)
    standin.on_callback = emit
    print(f"supabase stand-in listening on {standin.url}", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

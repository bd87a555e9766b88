"""The router on the public port 7860 (CONTRACT §5): ``/sdxl/*`` → SDXL, ``/wan/*`` and the legacy paths → WAN.

    /sdxl, /sdxl/<rest>                  → SDXL worker  /<rest>
    /wan,  /wan/<rest>                   → WAN worker   /<rest>
    /enhance, /memory/<rest>, /debug/env → WAN worker   (same path; what the app called before the split)
    GET /health                          → 200 with both workers' states; 503 only if neither serves (one
                                           fan-out at a time, its answer reused for HEALTH_CACHE_SECONDS)
    GET /router/health                   → 200 while the router process serves (the orchestrator's gate)
    GET /live                            → 200 while the router process serves (liveness: the orchestrator's restarts)
    GET /openapi.json                    → the OpenAPI 3.1 document of this port (common.openapi)
    GET /ops, /ops/data                  → the ops page and its JSON, under the admin key (router/ops.py)

It forwards the method, the body, the query string and every end-to-end header (``Authorization``
included); hop-by-hop headers are stripped both ways. It is not an open proxy: the destination is always
one of its two configured loopback base URLs plus the request's *path* — the request target's scheme and
authority (absolute-form targets) and the ``Host`` header never take part. A backend that cannot be reached
gives 502, one that does not answer in time 504, a body over the limit 413, each as JSON. The whole request
(body included) is read within ``HTTP_READ_TIMEOUT_SECONDS`` before anything is forwarded, and both health
routes are answered outside the ``ROUTER_THREADS`` bound (common/serving.py).

Run: ``python -m router [--port 7860]`` (gunicorn, one process, common.serving.DeadlineWorker).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import quote

import requests
from flask import Flask, Response, request

from common import openapi
from common.http import ApiError, check_health, create_base_app, pooled_session
from common.settings import Secret

from . import ops
from .collector import Collector, Sources

log = logging.getLogger("router")

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
#: Set by the HTTP layer on each side, never copied.
NOT_COPIED = HOP_BY_HOP | {"host", "content-length", "expect"}
LEGACY_WAN_PATHS = ("/enhance", "/debug/env")
LEGACY_WAN_PREFIXES = ("/memory/",)
PATH_SAFE = "/:@!$&'()*+,;=~"
HEALTH_PATHS = ("/health", "/router/health", "/live")
HEALTH_CACHE_SECONDS = 1.0
T = TypeVar("T")


@dataclass(frozen=True)
class RouterDeps:
    backends: Mapping[str, str]  # "sdxl" / "wan" → loopback base URL
    timeout: float = 90.0
    connect_timeout: float = 3.0
    max_body: int = 16 * 1024 * 1024
    health_timeout: float = 2.0
    session: requests.Session = field(default_factory=pooled_session)
    admin_key: Secret | None = None         # the ops page's key; unset: /ops refuses everything
    collector: Collector | None = None      # the ops page's data; None: an idle one (nothing asked)


def resolve(path: str) -> tuple[str, str] | None:
    """``(backend, path on the backend)`` for a request path, or None when nothing serves it."""
    for prefix in ("sdxl", "wan"):
        if path == f"/{prefix}" or path.startswith(f"/{prefix}/"):
            return prefix, path[len(prefix) + 1:] or "/"
    if path in LEGACY_WAN_PATHS or path == "/memory" or path.startswith(LEGACY_WAN_PREFIXES):
        return "wan", path
    return None


def end_to_end(headers) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones, minus those the ``Connection`` header names, minus Host/Content-Length."""
    named = {token.strip().lower() for value in headers.get_all("Connection") or [] for token in value.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in NOT_COPIED and k.lower() not in named]


class _ConnectionHeaders:
    """Adapter so request headers (werkzeug) and response headers (urllib3) share :func:`end_to_end`."""

    def __init__(self, items: list[tuple[str, str]]):
        self._items = items

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._items if k.lower() == name.lower()]


class Shared(Generic[T]):
    """``compute()``'s answer, computed by one caller at a time and reused for ``seconds``.

    The router's ``/health`` asks both workers (up to ``health_timeout`` each, in parallel). Computed per
    caller, concurrent callers queued behind one another in 2 s steps while a worker hung, and the app's 5 s
    check failed (review #15). Callers that arrive during a fan-out wait for it and share its answer.
    """

    def __init__(self, compute: Callable[[], T], seconds: float, clock: Callable[[], float] = time.monotonic):
        self._compute = compute
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[float, T] | None = None

    def __call__(self) -> T:
        with self._lock:
            if self._answer is None or self._clock() - self._answer[0] >= self._seconds:
                value = self._compute()
                self._answer = (self._clock(), value)
            return self._answer[1]


def create_app(deps: RouterDeps) -> Flask:
    session = deps.session
    session.trust_env = False  # never through an HTTP(S)_PROXY from the environment
    session.headers.clear()    # no Accept-Encoding or User-Agent of our own: the client's headers only
    pool = ThreadPoolExecutor(max_workers=len(deps.backends), thread_name_prefix="router-health")

    def fan_out() -> tuple[bool, dict]:
        futures = {name: pool.submit(check_health, f"{base}/health", deps.health_timeout, session)
                   for name, base in deps.backends.items()}
        states = {name: future.result() for name, future in futures.items()}
        workers = {name: {"status": "healthy" if h.ok else "unavailable", "detail": h.detail}
                   for name, h in states.items()}
        return any(h.ok for h in states.values()), {"workers": workers}

    app = create_base_app("router", Shared(fan_out, HEALTH_CACHE_SECONDS), max_body=deps.max_body)
    app.url_map.merge_slashes = False

    @app.get("/router/health")
    def router_health():
        return {"status": "healthy", "service": "router"}

    openapi.serve(app, openapi.router_document)
    ops.install(app, deps.collector or Collector(Sources(pod=None), interval=0), lambda: deps.admin_key)

    @app.route("/", defaults={"path": ""}, methods=METHODS, provide_automatic_options=False)
    @app.route("/<path:path>", methods=METHODS, provide_automatic_options=False)
    def forward(path: str):
        target = resolve(request.path)
        if target is None:
            raise ApiError(404, "not found: this port serves /sdxl/*, /wan/*, /enhance, /memory/* and /health")
        backend, backend_path = target
        return _forward(deps, session, backend, backend_path)

    return app


def _forward(deps: RouterDeps, session: requests.Session, backend: str, path: str) -> Response:
    url = deps.backends[backend] + quote(path, safe=PATH_SAFE)
    query = request.query_string.decode("latin-1")
    if query:
        url += "?" + query
    body = request.get_data(cache=False)  # over the limit: 413 (JSON, from create_base_app)
    headers = end_to_end(request.headers)
    forwarded_for = ", ".join(v for v in (request.headers.get("X-Forwarded-For"), request.remote_addr) if v)
    headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
    headers.append(("X-Forwarded-For", forwarded_for))
    try:
        answer = session.request(request.method, url, data=body or None, headers=_Multi(headers),
                                 timeout=(deps.connect_timeout, deps.timeout), allow_redirects=False, stream=True)
    except requests.Timeout:
        log.warning("%s %s: %s worker did not answer in time", request.method, request.path, backend)
        raise ApiError(504, f"the {backend} worker did not answer in time") from None
    except requests.RequestException as exc:
        log.warning("%s %s: %s worker unreachable (%s)", request.method, request.path, backend, type(exc).__name__)
        raise ApiError(502, f"the {backend} worker is not reachable") from None
    try:
        content = answer.raw.read(decode_content=False)
    except (requests.RequestException, OSError) as exc:
        log.warning("%s %s: %s worker broke off its answer (%s)", request.method, request.path, backend,
                    type(exc).__name__)
        raise ApiError(502, f"the {backend} worker broke off its answer") from None
    finally:
        answer.close()
    response_headers = end_to_end(_ConnectionHeaders(list(answer.raw.headers.items())))
    response = Response(content, status=answer.status_code)
    response.headers.clear()
    for key, value in response_headers:
        response.headers.add(key, value)
    return response


class _Multi(dict):
    """requests takes a mapping; keep repeated request headers by joining them (RFC 9110 §5.3)."""

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__()
        for key, value in items:
            existing = next((k for k in self if k.lower() == key.lower()), None)
            if existing is None:
                self[key] = value
            else:
                self[existing] = f"{self[existing]}, {value}"

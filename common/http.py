"""HTTP adapter helpers shared by every worker: the app factory with ``/health``, ``/live`` and ``/metrics``,
JSON errors (never an HTML page or a stack trace), body limits, and Bearer-key auth.

Routes stay a few lines: parse, call one method, map a typed error to a status code.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import wraps
from typing import Any, Protocol

import requests
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from common.settings import Secret

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 * 1024 * 1024


class RequestMetrics(Protocol):
    """What the app factory needs of a process's metrics: the exposition text and a per-route counter."""

    requests: Any  # a prometheus_client Counter labelled (route, status)

    def render(self) -> bytes: ...


class ApiError(Exception):
    """A client-facing error: ``status`` and a message that is safe to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_base_app(name: str, health: Callable[[], tuple[bool, dict[str, Any]]],
                    metrics: RequestMetrics | None = None, max_body: int = MAX_BODY_BYTES,
                    live: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (True, {})) -> Flask:
    """A Flask app with ``GET /health`` (readiness: 200 when ``health()`` says ready to take work, else 503),
    ``GET /live`` (liveness: 200 while ``live()`` says the process and its threads work, even while loading or
    busy; 503 when restarting it is the cure; the orchestrator restarts on this one only) and ``GET /metrics``."""
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.json.sort_keys = False

    @app.get("/health")
    def health_route():
        ready, details = health()
        body = {"status": "healthy" if ready else "unavailable", "service": name, **details}
        return jsonify(body), 200 if ready else 503

    @app.get("/live")
    def live_route():
        alive, details = live()
        return jsonify({"status": "alive" if alive else "dead", "service": name, **details}), 200 if alive else 503

    if metrics is not None:
        @app.get("/metrics")
        def metrics_route():
            return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

        @app.after_request
        def count(response):
            metrics.requests.labels(request.url_rule.rule if request.url_rule else "unmatched",
                                    str(response.status_code)).inc()
            return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify({"success": False, "error": exc.message}), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = {413: f"request body is larger than {max_body} bytes"}.get(exc.code, exc.description)
        return jsonify({"success": False, "error": message}), exc.code

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify({"success": False, "error": "internal error"}), 500

    return app


def json_body(optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, or ``ApiError(400)`` naming what is wrong."""
    raw = request.get_data(cache=True)
    if not raw:
        if optional:
            return {}
        raise ApiError(400, "request body is required (JSON object)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None

    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "request body must be a JSON object")
    return value


def _no_constant(name: str) -> float:
    """``NaN`` / ``Infinity`` are not JSON (Python's parser accepts them by default): refuse them."""
    raise ValueError(f"{name} is not valid JSON")


def presented_key(basic: bool = False) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or, with ``basic``, of ``Basic <user:key>`` (any user: a
    browser cannot send a Bearer header, so the ops page takes the key as the Basic password); else None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if not basic or scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon and password else None


def key_matches(presented: str | None, keys: Iterable[Secret | None]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    if presented is None:
        return False
    matched = False
    for key in keys:
        if key is not None:
            matched |= hmac.compare_digest(presented.encode(), key.reveal().encode())
    return matched


def require_key(keys: Callable[[], Iterable[Secret | None]], allow_anonymous: Callable[[], bool] = lambda: False):
    """Route decorator: a Bearer key from ``keys()``; no header at all passes only if ``allow_anonymous()``."""
    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            presented = presented_key()
            if presented is None and "Authorization" not in request.headers and allow_anonymous():
                return view(*args, **kwargs)
            if not key_matches(presented, keys()):
                raise ApiError(401, "missing or invalid API key")
            return view(*args, **kwargs)
        return wrapper
    return decorate


def require_admin(admin_key: Callable[[], Secret | None]):
    """Route decorator for control endpoints: always the admin key; unset admin key refuses everything."""
    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            key = admin_key()
            if key is None:
                raise ApiError(401, "control endpoints are disabled: WORKER_ADMIN_KEY is not set")
            if not key_matches(presented_key(), [key]):
                raise ApiError(401, "missing or invalid admin key")
            return view(*args, **kwargs)
        return wrapper
    return decorate


def pooled_session(size: int = 64):
    """A ``requests.Session`` whose connection pool fits ``size`` concurrent callers (the default 10 makes a
    threaded server discard and reopen connections under load). Never routed through an env proxy."""
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str  # "ok", "unavailable (503)", "no answer"


def check_health(url: str, timeout: float = 2.0, session: requests.Session | None = None) -> Health:
    """GET ``url``: ok on 200; anything else says what came back."""
    try:
        response = (session or _SESSION).get(url, timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return Health(False, "no answer")
    if response.status_code == 200:
        return Health(True, "ok")
    return Health(False, f"unavailable ({response.status_code})")


def _loopback_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never through an HTTP(S)_PROXY from the environment
    return session


_SESSION = _loopback_session()

"""The ops page on the router's port, under the admin key (``WORKER_ADMIN_KEY``).

    GET /ops        the page (router/ops.html: one file, inline script and style, no external resource)
    GET /ops/data   its JSON document (router/collector.py), polled by the page every few seconds

A browser cannot send a Bearer header, so both routes take the admin key as the *password* of HTTP Basic (any
user name): the first visit answers 401 with ``WWW-Authenticate: Basic``, the browser asks for the key once and
sends it with every later request of the page, its ``fetch`` included, so the page's script never holds it.
``Authorization: Bearer <admin key>`` works too (scripts, ``curl``). The key never travels in a URL. Keys are
compared in constant time; a refusal is logged with the caller's address, never with what it sent. Unset admin
key: both routes refuse everything, like every control route.

The page is served with a Content-Security-Policy that allows only its own inline script and style (by their
SHA-256), requests to this origin (``connect-src 'self'``), and nothing else: no frame, form, base or plug-in.
Both answers are ``Cache-Control: no-store``.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable
from functools import cache, wraps
from pathlib import Path

import requests
from flask import Flask, Response, jsonify, request
from prometheus_client.parser import text_string_to_metric_families

from common.http import key_matches, presented_key
from common.settings import Secret

from . import ops_redis
from .collector import Collector, Sources
from .config import RouterSettings

log = logging.getLogger("router.ops")

PAGE = Path(__file__).with_name("ops.html")
UTILIZATION_METRIC = "pod_gpu_utilization_ratio"   # memory_manager/pod.py: 0..1 per fleet GPU (label gpu)
REALM = 'Basic realm="fleet ops", charset="UTF-8"'
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                  "X-Frame-Options": "DENY"}


def _refused(message: str) -> Response:
    response = jsonify({"success": False, "error": message})
    response.status_code = 401
    response.headers["WWW-Authenticate"] = REALM
    response.headers.update(COMMON_HEADERS)
    return response


def admin_only(admin_key: Callable[[], Secret | None]):
    """Route decorator: the admin key by Basic or Bearer, else 401 with the Basic challenge (JSON body)."""
    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            key = admin_key()
            if key is None:
                return _refused("the ops page is disabled: WORKER_ADMIN_KEY is not set")
            presented = presented_key(basic=True)
            if not key_matches(presented, [key]):
                if presented is not None or "Authorization" in request.headers:
                    log.warning("ops: %s %s refused: wrong or malformed admin key (from %s)", request.method,
                                request.path, request.remote_addr)
                return _refused("the admin key is required (HTTP Basic: any user name, the key as password)")
            return view(*args, **kwargs)
        return wrapper
    return decorate


@cache
def page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (the inline script and style allowed by their hashes)."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    policy = "; ".join([
        "default-src 'none'", "script-src " + " ".join(map(_digest, scripts)),
        "style-src " + " ".join(map(_digest, styles)), "connect-src 'self'", "img-src data:", "base-uri 'none'",
        "form-action 'none'", "frame-ancestors 'none'"])
    return html.encode("utf-8"), policy


def _digest(text: str) -> str:
    """A CSP source for one inline element: ``'sha256-<base64 of its exact text>'``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def collector_from(settings: RouterSettings) -> Collector:
    """The collector of a running router: every source on loopback, Redis as the workers reach it."""
    session = requests.Session()
    session.trust_env = False   # loopback only, never through an HTTP(S)_PROXY from the environment
    commands = ops_redis.commands_from(settings)
    status = f"http://127.0.0.1:{settings.status_port}/status" if settings.status_port else None
    return Collector(Sources(
        memory=_json_source(session, settings.url("memory_manager") + "/memory/status"),
        utilization=_utilization_source(session, settings.url("memory_manager") + "/metrics"),
        orchestrator=_json_source(session, status) if status else None,
        chat=_json_source(session, settings.url("chat") + "/status"),
        redis=(lambda count: ops_redis.read(commands, count)) if commands is not None else None,
    ), interval=settings.ops_collect_seconds)


def _json_source(session: requests.Session, url: str, timeout: float = 2.0) -> Callable[[], dict]:
    def fetch() -> dict:
        answer = session.get(url, timeout=timeout, allow_redirects=False)
        answer.raise_for_status()
        value = answer.json()
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    return fetch


def _utilization_source(session: requests.Session, url: str, timeout: float = 2.0) -> Callable[[], dict]:
    """Each GPU's utilisation in percent, from the memory manager's Prometheus gauge (NVML); {} where it has no
    such gauge (no NVML) or serves no metrics at all."""
    def fetch() -> dict[int, float]:
        answer = session.get(url, timeout=timeout, allow_redirects=False)
        if answer.status_code == 404:
            return {}
        answer.raise_for_status()
        found = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                if sample.name == UTILIZATION_METRIC and sample.labels.get("gpu", "").isdigit():
                    found[int(sample.labels["gpu"])] = round(100.0 * sample.value, 1)
        return found
    return fetch


def install(app: Flask, collector: Collector, admin_key: Callable[[], Secret | None]) -> None:
    """Add ``GET /ops`` and ``GET /ops/data`` to the router's app."""
    guard = admin_only(admin_key)

    @app.get("/ops")
    @guard
    def ops_page():
        body, policy = page()
        response = Response(body, mimetype="text/html")
        response.headers.update({**COMMON_HEADERS, "Content-Security-Policy": policy})
        return response

    @app.get("/ops/data")
    @guard
    def ops_data():
        response = jsonify(collector.snapshot())
        response.headers.update({**COMMON_HEADERS, "Content-Security-Policy": "default-src 'none'"})
        return response

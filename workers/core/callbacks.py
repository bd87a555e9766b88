"""Callbacks to the app's ``job-callback`` edge function (CONTRACT §4).

The body is serialised once; those exact bytes are signed (``X-Callback-Signature: sha256=<hmac>``) and
sent. Terminal callbacks are retried with exponential backoff on connection errors, timeouts, 429 and 5xx
for ``CALLBACK_RETRY_SECONDS``; a 4xx other than 429 is final (logged with the answer). What still cannot
be delivered goes to the Redis outbox (atomically with the job's ack, see ``ReliableQueue``) and the
``OutboxSender`` delivers it later. Progress callbacks are one best-effort try in the background.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from enum import Enum
from typing import Any, Callable

import requests

from . import keys
from .metrics import Metrics
from .settings import Settings
from .transport import Transport, TransportError

log = logging.getLogger(__name__)


class Outcome(str, Enum):
    DELIVERED = "delivered"   # 2xx (a "skipped" answer included)
    REJECTED = "rejected"     # 4xx other than 429: retrying will not help
    FAILED = "failed"         # still failing after the retry budget


def encode(job_id: str, worker_id: str, status: str, assets: list[dict[str, Any]] | None = None,
           error_message: str | None = None, metadata: dict[str, Any] | None = None) -> bytes:
    body = {"job_id": job_id, "worker_id": worker_id, "status": status, "assets": assets or [],
            "error_message": error_message, "metadata": metadata or {}}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class CallbackClient:
    def __init__(self, url: str, service_key: str, secret: str, retry_seconds: float = 240.0,
                 timeout: float = 15.0, session: requests.Session | None = None,
                 metrics: Metrics | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoint = url.rstrip("/") + "/functions/v1/job-callback"
        self._key = service_key
        self._secret = secret
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.session = session or requests.Session()
        self.metrics = metrics
        self.sleep = sleep
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> "CallbackClient":
        settings.require("supabase_url", "supabase_service_key", "job_callback_secret")
        return cls(settings.supabase_url, settings.supabase_service_key.reveal(),
                   settings.job_callback_secret.reveal(), settings.callback_retry_seconds,
                   settings.callback_timeout_seconds, metrics=metrics)

    def post_once(self, body: bytes, timeout: float | None = None) -> Outcome | None:
        """One attempt: the outcome, or ``None`` for a failure worth retrying."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._key}",
                   "apikey": self._key, "X-Callback-Signature": sign(self._secret, body)}
        try:
            response = self.session.post(self.endpoint, data=body, headers=headers,
                                         timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            self._count(type(exc).__name__)
            return None
        if 200 <= response.status_code < 300:
            return Outcome.DELIVERED
        self._count(str(response.status_code))
        if response.status_code == 429 or response.status_code >= 500:
            return None
        log.error("job-callback refused a callback with HTTP %d: %s", response.status_code,
                  response.text[:300].replace("\n", " "))
        return Outcome.REJECTED

    def deliver(self, body: bytes) -> Outcome:
        """Terminal delivery with exponential backoff (1, 2, 4 … 30 s) within the retry budget."""
        deadline = self.clock() + self.retry_seconds
        delay = 1.0
        while True:
            outcome = self.post_once(body)
            if outcome is not None:
                return outcome
            if self.clock() + delay > deadline:
                return Outcome.FAILED
            self.sleep(delay)
            delay = min(delay * 2, 30.0)

    def progress(self, body: bytes) -> None:
        """Best effort, in the background: one short try, never blocks or fails the job."""
        threading.Thread(target=self.post_once, args=(body, 5.0), name="progress-callback",
                         daemon=True).start()

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.callback_failures.labels(status).inc()


_DELETE_IF_SAME = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


class OutboxSender:
    """Re-sends terminal callbacks kept in the outbox; removes each only once delivered (or rejected)."""

    def __init__(self, transport: Transport, client: CallbackClient, metrics: Metrics | None = None):
        self.transport = transport
        self.client = client
        self.metrics = metrics

    def pending(self) -> int:
        return int(self.transport.command("HLEN", keys.OUTBOX))

    def drain_once(self) -> int:
        """Try every outbox entry once; return how many left the outbox."""
        flat = self.transport.command("HGETALL", keys.OUTBOX) or []
        entries = dict(zip(flat[0::2], flat[1::2])) if isinstance(flat, list) else dict(flat)
        sent = 0
        for job_id, body in entries.items():
            if self.client.post_once(body) is None:
                continue
            self.transport.command("EVAL", _DELETE_IF_SAME, 1, keys.OUTBOX, job_id, body)
            sent += 1
        if self.metrics is not None:
            self.metrics.outbox.set(len(entries) - sent)
        return sent

    def run(self, stop: threading.Event, interval: float = 10.0) -> None:
        while not stop.wait(interval):
            try:
                if self.drain_once():
                    log.info("delivered outbox callbacks")
            except TransportError as exc:
                log.warning("outbox: %s", exc)

"""Callbacks to the app's ``job-callback`` edge function (CONTRACT §4).

The body is serialised once; those exact bytes are signed (``X-Callback-Signature: sha256=<hmac>``) and
sent. Terminal callbacks are retried (``retry.call``: exponential backoff with jitter, ``Retry-After``
honoured) on connection errors, timeouts, 429 and 5xx for ``CALLBACK_RETRY_SECONDS``; a 4xx other than 429
is final (logged once with the answer, the body kept in ``callbacks:rejected`` for a manual replay). The
terminal step records the body in the Redis outbox under a lease before delivery (see ``ReliableQueue``);
``Outbox`` settles it and ``OutboxSender`` delivers what is still owed, one sender per entry. Progress
callbacks are one best-effort try in the background.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from enum import Enum
from typing import Any

import requests

from common import keys, logs
from common.settings import Settings

from . import retry
from .metrics import Metrics
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
                 clock: Callable[[], float] = time.monotonic, retry_first: float = 1.0):
        if retry_first <= 0:
            raise ValueError(f"retry_first must be positive seconds, got {retry_first!r}")
        self.endpoint = url.rstrip("/") + "/functions/v1/job-callback"
        self.retry_first = retry_first
        self._key = service_key
        self._secret = secret
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.session = session or requests.Session()
        self.metrics = metrics
        self.sleep = sleep
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> CallbackClient:
        settings.require("supabase_url", "supabase_service_key", "job_callback_secret")
        return cls(settings.supabase_url, settings.supabase_service_key.reveal(),
                   settings.job_callback_secret.reveal(), settings.callback_retry_seconds,
                   settings.callback_timeout_seconds, metrics=metrics,
                   retry_first=settings.callback_retry_first_seconds)

    def post_once(self, body: bytes, timeout: float | None = None) -> Outcome | None:
        """One attempt: the outcome, or ``None`` for a failure worth retrying."""
        return self._attempt(body, timeout).value

    def _attempt(self, body: bytes, timeout: float | None = None, terminal: bool = True) -> retry.Answer:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._key}",
                   "apikey": self._key, "X-Callback-Signature": sign(self._secret, body)}
        try:
            response = self.session.post(self.endpoint, data=body, headers=headers,
                                         timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            self._count(type(exc).__name__)
            return retry.Answer(retry=True, problem=type(exc).__name__)
        if 200 <= response.status_code < 300:
            return retry.Answer(Outcome.DELIVERED)
        self._count(str(response.status_code))
        if response.status_code == 429 or response.status_code >= 500:
            return retry.Answer(retry=True, retry_after=retry.retry_after(response.headers),
                                problem=f"HTTP {response.status_code}")
        answer = response.text[:300].replace("\n", " ")
        if terminal:  # final per the contract; logged here once (the body goes to callbacks:rejected)
            log.error("job-callback refused a callback with HTTP %d: %s", response.status_code, answer)
        else:
            log.warning("job-callback refused a progress callback with HTTP %d: %s", response.status_code, answer)
        return retry.Answer(Outcome.REJECTED)

    def deliver(self, body: bytes) -> Outcome:
        """Terminal delivery: 1, 2, 4 … 30 s backoff (from ``retry_first``, plus up to as much jitter) and the
        server's ``Retry-After``, as long as the next try still starts within ``retry_seconds``; then ``FAILED``."""
        answer = retry.call(lambda: self._attempt(body), initial=self.retry_first, cap=30.0,
                            deadline=self.clock() + self.retry_seconds, sleep=self.sleep, clock=self.clock,
                            on_retry=self._retried)
        return Outcome.FAILED if answer.retry else answer.value

    def progress(self, body: bytes) -> None:
        """Best effort, in the background: one short try, never blocks or fails the job."""
        threading.Thread(target=logs.carry(self._attempt), args=(body, 5.0, False), name="progress-callback",
                         daemon=True).start()

    def _retried(self, answer: retry.Answer) -> None:
        if self.metrics is not None:
            self.metrics.callback_retries.labels(answer.problem or "unknown").inc()

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.callback_failures.labels(status).inc()


# Each script is one atomic step over the outbox hash, the entry's lease and (rejected) the rejected hash.
# KEYS[1] outbox, KEYS[2] the entry's lease; ARGV[1] job id, then the body and/or the owner.
_TAKE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
_DELIVERED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
_REJECTED = """
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Outbox:
    """The durable record of owed terminal callbacks, one lease per entry (``keys.outbox_lease``).

    Whoever holds an entry's lease is the one process allowed to POST it; everyone else skips it, so N
    worker processes sharing the hash give one delivery per entry, not N. A lease names its ``owner`` and
    expires after ``lease_seconds`` (about twice the holder's delivery budget), so an owner that died
    leaves the entry to the next sender once the lease lapses. The runner's terminal step writes an entry
    together with its lease (owner = the worker id) and then calls ``delivered``/``rejected``/``release``.
    """

    def __init__(self, transport: Transport, owner: str, lease_seconds: float):
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.transport = transport
        self.owner = owner
        self.lease_seconds = lease_seconds

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    def claim(self, job_id: str) -> bool:
        """Take the entry's lease (SET NX): False if someone holds it."""
        return bool(self.transport.command("SET", keys.outbox_lease(job_id), self.owner, "NX",
                                           "PX", self._lease_ms))

    def take(self, job_id: str) -> bytes | None:
        """Claim the lease of an entry that still exists and return its body, in one step; else ``None``.

        One step matters: reading the body first and claiming later could resend an entry another process
        delivered (and whose lease it dropped) in between."""
        body = self.transport.command("EVAL", _TAKE, 2, keys.OUTBOX, keys.outbox_lease(job_id), job_id,
                                      self.owner, self._lease_ms)
        return body or None

    def delivered(self, job_id: str, body: bytes) -> None:
        """Drop the entry if it still holds ``body`` (a newer body stays owed) and our lease."""
        self.transport.command("EVAL", _DELIVERED, 2, keys.OUTBOX, keys.outbox_lease(job_id), job_id, body,
                               self.owner)

    def rejected(self, job_id: str, body: bytes) -> None:
        """The app refused ``body`` for good (a 4xx): keep it in ``callbacks:rejected`` for a manual replay,
        then as ``delivered``."""
        self.transport.command("EVAL", _REJECTED, 3, keys.OUTBOX, keys.outbox_lease(job_id), keys.REJECTED,
                               job_id, body, self.owner)

    def release(self, job_id: str) -> None:
        """Give the lease up (delivery failed for now): the next sender may try."""
        self.transport.command("EVAL", _RELEASE, 1, keys.outbox_lease(job_id), self.owner)

    def pending(self) -> int:
        return int(self.transport.command("HLEN", keys.OUTBOX))

    def job_ids(self) -> list[str]:
        found = self.transport.command("HKEYS", keys.OUTBOX) or []
        return [j.decode() if isinstance(j, bytes) else str(j) for j in found]


class OutboxSender:
    """Re-sends terminal callbacks kept in the outbox: one try per entry per round, each under its lease,
    skipping entries another process holds (the runner still delivering it, or another sender)."""

    def __init__(self, transport: Transport, client: CallbackClient, metrics: Metrics | None = None, *,
                 owner: str | None = None):
        self.client = client
        self.metrics = metrics
        # One POST is the sender's delivery budget per entry; its lease covers two.
        self.outbox = Outbox(transport, owner or f"outbox-sender:{uuid.uuid4().hex}", 2 * client.timeout)

    def pending(self) -> int:
        return self.outbox.pending()

    def drain_once(self) -> int:
        """Try every outbox entry nobody holds once; return how many left the outbox."""
        sent = 0
        for job_id in self.outbox.job_ids():
            body = self.outbox.take(job_id)
            if body is None:
                continue
            try:
                outcome = self.client.post_once(body)
            except BaseException:
                self.outbox.release(job_id)
                raise
            if outcome is None:
                self.outbox.release(job_id)
                continue
            if outcome is Outcome.REJECTED:
                self.outbox.rejected(job_id, body)
            else:
                self.outbox.delivered(job_id, body)
            sent += 1
        if self.metrics is not None:
            self.metrics.outbox.set(self.outbox.pending())
        return sent

    def run(self, stop: threading.Event, interval: float = 10.0) -> None:
        """Every ``interval`` until ``stop``; a round that fails is logged and the next one tries again (this
        thread is the only one re-sending what the runner could not deliver, so it must not die)."""
        while not stop.wait(interval):
            try:
                sent = self.drain_once()
                if sent:
                    log.info("outbox: %d terminal callback(s) delivered or refused", sent)
            except TransportError as exc:
                log.warning("outbox: %s", exc)
            except Exception:  # noqa: BLE001 - see the docstring
                log.exception("outbox: round failed")

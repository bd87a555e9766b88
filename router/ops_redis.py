"""What the ops page reads from Redis: queue depths, the callback outbox, and the job journal.

The router imports only ``common/`` (tests/test_architecture.py), so it has a reader of its own rather than the
workers' transport: redis-py for ``REDIS_URL``, Upstash's REST API over plain HTTP otherwise (with a timeout,
which the Upstash SDK's client lacks). It only reads, and every reading is at most two commands: ``SMEMBERS
workers:active`` (which processing lists exist) and one script that measures everything else, so that on
Upstash, which bills per command, a reading every 5 s costs about 1,400 commands an hour.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import requests

from common import keys
from common.settings import QueueConnection

log = logging.getLogger("router.ops")

TIMEOUT_SECONDS = 3.0
# KEYS: per queue (waiting, dead), then outbox, rejected, journal, then the processing lists; ARGV[1] queue
# count, [2] journal records to read. Returns the lengths in KEYS order (processing lists last) and the records.
_MEASURE = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, 2 * n do out[#out + 1] = redis.call('LLEN', KEYS[i]) end
out[#out + 1] = redis.call('HLEN', KEYS[2 * n + 1])
out[#out + 1] = redis.call('HLEN', KEYS[2 * n + 2])
for i = 2 * n + 4, #KEYS do out[#out + 1] = redis.call('LLEN', KEYS[i]) end
out[#out + 1] = redis.call('LRANGE', KEYS[2 * n + 3], 0, tonumber(ARGV[2]) - 1)
return out
"""


class ReadError(Exception):
    """Redis could not be read (unreachable, refused, or an answer of the wrong shape)."""


class Commands(Protocol):
    def smembers(self, key: str) -> list[str]: ...

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Any: ...


@dataclass(frozen=True)
class QueueDepth:
    name: str
    waiting: int
    processing: int
    dead: int


@dataclass(frozen=True)
class Reading:
    queues: list[QueueDepth]
    outbox: int
    rejected: int
    journal: list[dict[str, Any]]   # newest first; records that are not JSON objects are left out


class RedisProtocol:
    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS):
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           decode_responses=True)

    def smembers(self, key: str) -> list[str]:
        try:
            return sorted(self.client.smembers(key))
        except redis.RedisError as exc:
            raise ReadError(f"redis: {type(exc).__name__}") from None

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self.client.eval(script, len(keys), *keys, *args)
        except redis.RedisError as exc:
            raise ReadError(f"redis: {type(exc).__name__}") from None


class UpstashRest:
    """One command per ``POST <url>`` with a JSON array body, ``Authorization: Bearer <token>``."""

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT_SECONDS):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = f"Bearer {token}"

    def _command(self, *args: Any) -> Any:
        try:
            answer = self.session.post(self.url, json=[str(a) for a in args], timeout=self.timeout)
            body = answer.json()
        except (requests.RequestException, ValueError) as exc:
            raise ReadError(f"upstash: {type(exc).__name__}") from None
        if not isinstance(body, dict) or "error" in body or answer.status_code != 200:
            raise ReadError(f"upstash: answered {answer.status_code}")
        return body.get("result")

    def smembers(self, key: str) -> list[str]:
        return sorted(self._command("SMEMBERS", key) or [])

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._command("EVAL", script, len(keys), *keys, *args)


def commands_from(settings: QueueConnection) -> Commands | None:
    """``REDIS_URL`` wins, as for the workers; None when no Redis is configured (the page says so)."""
    if settings.redis_url is not None:
        return RedisProtocol(settings.redis_url.reveal())
    if settings.upstash_url and settings.upstash_token:
        return UpstashRest(settings.upstash_url, settings.upstash_token.reveal())
    return None


def read(commands: Commands, journal_records: int = keys.JOURNAL_MAX) -> Reading:
    """One reading of every queue, the outbox and the journal (two commands)."""
    members = [keys.parse_active_member(m) for m in commands.smembers(keys.ACTIVE_WORKERS)]
    members = [(q, w) for q, w in members if q in keys.QUEUES and w]
    processing = [keys.processing(q, w) for q, w in members]
    fixed = [k for q in keys.QUEUES for k in (q, keys.dead(q))] + [keys.OUTBOX, keys.REJECTED, keys.JOURNAL]
    reply = commands.eval(_MEASURE, fixed + processing, [len(keys.QUEUES), journal_records])
    n = len(keys.QUEUES)
    if not isinstance(reply, list) or len(reply) != 2 * n + 3 + len(processing):
        raise ReadError("redis: the measuring script answered an unexpected shape")
    lengths, records = reply[:-1], reply[-1]
    held = dict.fromkeys(keys.QUEUES, 0)
    for (queue, _), length in zip(members, lengths[2 * n + 2:]):
        held[queue] += int(length)
    queues = [QueueDepth(q, int(lengths[2 * i]), held[q], int(lengths[2 * i + 1])) for i, q in enumerate(keys.QUEUES)]
    return Reading(queues, int(lengths[2 * n]), int(lengths[2 * n + 1]), _records(records))


def _records(raw: Any) -> list[dict[str, Any]]:
    out = []
    for item in raw if isinstance(raw, list) else []:
        try:
            value = json.loads(item)
        except (TypeError, ValueError):
            continue
        if isinstance(value, dict):
            out.append(value)
    return out

"""One small interface over two Redis transports (CONTRACT §1).

``RedisProtocolTransport`` speaks the Redis protocol (redis-py; blocking moves allowed);
``UpstashRestTransport`` speaks Upstash REST through the official SDK's HTTP client (no blocking commands:
the queue polls). Both return bulk strings as the exact ``bytes`` Redis holds (a non-UTF-8 element included)
and everything else as plain Python values, and raise ``TransportError`` for any connection or server
failure, a reply that came too late included: the command may have run, so the caller must not read it as
"nothing happened" (review #3).
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Protocol

import httpx
import redis
from upstash_redis.errors import UpstashError
from upstash_redis.http import SyncHttpClient, make_headers

from common.errors import ConfigError
from common.settings import Settings


class TransportError(Exception):
    """Redis could not be reached or refused a command."""


class Transport(Protocol):
    can_block: bool

    def command(self, *args: Any) -> Any:
        """Run one command; bulk strings come back as ``bytes``."""

    def blocking_move(self, source: str, destination: str, side: str, timeout: float) -> bytes | None:
        """BLMOVE source destination <side> RIGHT timeout (only when ``can_block``)."""

    def close(self) -> None: ...


class RedisProtocolTransport:
    can_block = True

    def __init__(self, url: str, timeout: float):
        self.timeout = timeout
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=30, decode_responses=False)

    def command(self, *args: Any) -> Any:
        try:
            return self.client.execute_command(*args)
        except redis.RedisError as exc:
            raise TransportError(f"redis: {type(exc).__name__}: {exc}") from None

    def blocking_move(self, source: str, destination: str, side: str, timeout: float) -> bytes | None:
        # The socket timeout outlasts the server-side block, so a read timeout means a late reply, not an empty
        # queue: the move may have happened, and ``command`` reports it as a TransportError.
        return self.command("BLMOVE", source, destination, side.upper(), "RIGHT", timeout)

    def close(self) -> None:
        self.client.close()


class UpstashRestTransport:
    """Upstash REST through the SDK's HTTP client, with replies in ``Upstash-Encoding: base64`` decoded here
    to bytes. The SDK's own decoding is strict UTF-8 text, so a non-UTF-8 element would come back as an
    error after LMOVE had moved it, and would cycle between the queue and the processing list for ever
    (review #10). The SDK's per-command reply shaping is skipped too: replies have the Redis shapes."""

    can_block = False

    def __init__(self, url: str, token: str, timeout: float):
        self.url = url
        self._headers = make_headers(token, "base64", allow_telemetry=False)
        self._http = SyncHttpClient(encoding=None, retries=0, retry_interval=0, sync_token_cb=self._sync_token)
        # The SDK's HTTP client has no timeout; a hung request would stall the worker forever.
        self._http._client = httpx.Client(timeout=httpx.Timeout(timeout))

    def _sync_token(self, token: str) -> None:
        """Read-your-writes across Upstash replicas: send back the last sync token we were given."""
        self._headers["Upstash-Sync-Token"] = token

    def command(self, *args: Any) -> Any:
        try:
            return _from_base64(self._http.execute(self.url, self._headers, [_to_text(a) for a in args]))
        except UpstashError as exc:
            raise TransportError(f"upstash: {exc}") from None
        except (httpx.HTTPError, ValueError, UnicodeDecodeError) as exc:
            raise TransportError(f"upstash: {type(exc).__name__}") from None

    def blocking_move(self, source: str, destination: str, side: str, timeout: float) -> bytes | None:
        raise TransportError("Upstash REST cannot block; poll with LMOVE")

    def close(self) -> None:
        self._http.close()


def _to_text(value: Any) -> str:
    # REST carries JSON text: arguments travel as UTF-8 strings. Scripts that must name a stored element that
    # may not be text (ReliableQueue's) pass its SHA-1 instead of its bytes.
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _from_base64(value: Any) -> Any:
    """A base64-encoded REST reply as Redis holds it: bulk strings as bytes; the one unencoded status reply,
    ``OK``, as ``b"OK"`` ("OK" is not valid base64, so the two cannot be confused)."""
    if isinstance(value, str):
        if value == "OK":
            return b"OK"
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            return value.encode("utf-8")   # another status reply the server left unencoded
    if isinstance(value, list):
        return [_from_base64(v) for v in value]
    return value


def from_settings(settings: Settings) -> Transport:
    """``REDIS_URL`` wins; else Upstash REST; else a clear error."""
    if settings.redis_url is not None:
        # A blocking move of up to `poll_max_seconds` must fit inside the socket timeout.
        return RedisProtocolTransport(settings.redis_url.reveal(),
                                      settings.redis_timeout_seconds + settings.poll_max_seconds)
    if settings.upstash_url and settings.upstash_token:
        return UpstashRestTransport(settings.upstash_url, settings.upstash_token.reveal(),
                                    settings.redis_timeout_seconds)
    raise ConfigError("no queue transport: set REDIS_URL, or UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN")

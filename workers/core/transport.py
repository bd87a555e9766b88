"""One small interface over two Redis transports (CONTRACT §1).

``RedisProtocolTransport`` speaks the Redis protocol (redis-py; blocking moves allowed);
``UpstashRestTransport`` speaks Upstash REST through the official SDK (no blocking commands: the queue
polls). Both return list elements as ``bytes`` and everything else as plain Python values, and raise
``TransportError`` for any connection or server failure.
"""
from __future__ import annotations

from typing import Any, Protocol

import httpx
import redis
from upstash_redis import Redis as UpstashRedis
from upstash_redis.errors import UpstashError

from .errors import ConfigError
from .settings import Settings


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
        # The socket timeout must outlast the server-side block.
        try:
            return self.client.execute_command("BLMOVE", source, destination, side.upper(), "RIGHT", timeout)
        except redis.TimeoutError:
            return None
        except redis.RedisError as exc:
            raise TransportError(f"redis: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.client.close()


class UpstashRestTransport:
    can_block = False

    def __init__(self, url: str, token: str, timeout: float):
        self.client = UpstashRedis(url, token, rest_retries=0, allow_telemetry=False, read_your_writes=True)
        # The SDK's HTTP client has no timeout; a hung request would stall the worker forever.
        self.client._http._client = httpx.Client(timeout=httpx.Timeout(timeout))

    def command(self, *args: Any) -> Any:
        try:
            return _to_bytes(self.client.execute([_to_text(a) for a in args]))
        except UpstashError as exc:
            raise TransportError(f"upstash: {exc}") from None
        except (httpx.HTTPError, ValueError, UnicodeDecodeError) as exc:
            raise TransportError(f"upstash: {type(exc).__name__}") from None

    def blocking_move(self, source: str, destination: str, side: str, timeout: float) -> bytes | None:
        raise TransportError("Upstash REST cannot block; poll with LMOVE")

    def close(self) -> None:
        self.client.close()


def _to_text(value: Any) -> str:
    # REST carries JSON text: elements travel as UTF-8 strings (a REST producer cannot store anything else).
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _to_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list):
        return [_to_bytes(v) for v in value]
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

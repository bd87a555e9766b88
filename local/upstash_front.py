"""An Upstash-REST-compatible HTTP front over a real Redis, for tests and local runs.

No server package exists for Upstash's REST API, so this reproduces its documented behaviour closely
enough that the official ``upstash_redis.Redis(url, token)`` SDK and the app's raw REST calls work:

- ``POST /`` with a JSON command array (``["LPUSH", "k", "v"]``) → ``{"result": ...}``;
- ``POST /pipeline`` and ``POST /multi-exec`` with an array of command arrays → an array of
  ``{"result": ...}`` / ``{"error": ...}``;
- the path form ``GET|POST /<command>/<arg>/...`` (percent-decoded segments); a POST body is appended
  verbatim as the last argument, followed by any query parameters (``?EX=100`` → ``EX 100``);
- ``Authorization: Bearer <token>`` or ``?_token=`` (401 ``{"error": "Unauthorized"}`` otherwise);
- ``Upstash-Encoding: base64``: every string in the result base64-encoded, except the ``OK`` status reply;
- errors → 400 ``{"error": "ERR ..."}``; blocking and connection-state commands refused.

Replies keep Redis' types: integers as numbers, bulk strings as strings, arrays as arrays, nil as null.

Fault modes (``UpstashFront.faults``, off by default), for the fault tests: each command request draws, from
a seeded generator, whether it is dropped (nothing runs, the connection is closed unanswered), whose reply is
lost (the command runs, then the connection is closed unanswered) or whose reply is held (the command runs,
the answer comes ``hold_seconds`` later: past the client's timeout). A client cannot tell a dropped request
from a lost reply: that is the point.
"""

from __future__ import annotations

import base64
import hmac
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

import redis
from flask import Flask, Response, request
from redis._parsers import _RESP2Parser  # private, pinned with redis==8.1.0 in requirements.txt
from redis.exceptions import ResponseError
from redis.utils import SENTINEL

from local.net import BackgroundServer

Command = list[bytes]

#: Commands that block the connection: Upstash REST refuses them (a REST consumer polls instead).
BLOCKING_COMMANDS = frozenset(
    {"BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP", "WAIT", "WAITAOF",
     "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "MONITOR"}
)
#: Commands that would change the shared connection's state or the server itself: not served over REST.
UNSUPPORTED_COMMANDS = frozenset(
    {"MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "SELECT", "SWAPDB", "AUTH", "HELLO", "RESET", "QUIT",
     "CLIENT", "SHUTDOWN", "SYNC", "PSYNC", "REPLICAOF", "SLAVEOF", "DEBUG", "FAILOVER"}
)


class CommandError(Exception):
    """A request that cannot be executed; ``str(self)`` is the Redis-style error text."""


class _Status(bytes):
    """A RESP simple-string ("status") reply such as ``+OK``, as opposed to a bulk string."""


class _StatusAwareParser(_RESP2Parser):
    """RESP2 parser that marks status replies, so ``OK`` can stay unencoded like Upstash's."""

    def _read_response(self, disable_decoding: bool = False, timeout: Any = SENTINEL) -> Any:
        raw = self._buffer.readline(timeout=timeout)
        if not raw:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        byte, rest = raw[:1], raw[1:]
        if byte == b"-":
            text = rest.decode("utf-8", errors="replace")
            error = self.parse_error(text)
            if isinstance(error, redis.exceptions.ConnectionError):
                raise error
            return ResponseError(text)  # the full text, "ERR ..." prefix included, as Upstash shows it
        if byte == b"+":
            return _Status(rest)
        if byte == b":":
            return int(rest)
        if byte in (b"$", b"*") and rest == b"-1":
            return None
        if byte == b"$":
            return bytes(self._buffer.read(int(rest), timeout=timeout))
        if byte == b"*":
            return [self._read_response(disable_decoding, timeout) for _ in range(int(rest))]
        raise redis.exceptions.InvalidResponse(f"Protocol Error: {raw!r}")


# --------------------------------------------------------------------------- request → command
def _arg(value: Any) -> bytes:
    """One JSON command element as Redis argument bytes (numbers as their text, like Upstash)."""
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode()
    raise CommandError(f"ERR invalid command argument of type {type(value).__name__}")


def _json_command(value: Any) -> Command:
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise CommandError("ERR a command must be a non-empty JSON array starting with the command name")
    return [_arg(v) for v in value]


def _json_body() -> Any:
    try:
        return json.loads(request.get_data())
    except ValueError as exc:
        raise CommandError(f"ERR invalid JSON body: {exc}") from None


def _path_command() -> Command:
    """The path form: ``/cmd/a/b`` (+ POST body as last argument, + query parameters).

    Segments are split on the *raw* path before percent-decoding, so ``%2F`` stays inside one argument.
    """
    raw_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
    parts = urlsplit(raw_uri)
    command = [unquote_to_bytes(seg) for seg in parts.path.strip("/").split("/")]
    body = request.get_data()
    if request.method in ("POST", "PUT") and body:
        command.append(body)
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "_token":
            command.append(name.encode())
            if value:
                command.append(value.encode())
    return command


def check_command(command: Sequence[bytes]) -> None:
    """Raise :class:`CommandError` for commands Upstash REST does not serve (blocking, connection state)."""
    name = command[0].decode("utf-8", errors="replace").upper()
    if not name:
        raise CommandError("ERR empty command")
    if name in ("XREAD", "XREADGROUP"):
        options = [a.upper() for a in command[1:]]
        options = options[: options.index(b"STREAMS")] if b"STREAMS" in options else options
        if b"BLOCK" in options:
            raise CommandError(f"ERR blocking command '{name} BLOCK' is not supported over REST")
    if name in BLOCKING_COMMANDS:
        raise CommandError(f"ERR blocking command '{name}' is not supported over REST")
    if name in UNSUPPORTED_COMMANDS:
        raise CommandError(f"ERR command '{name}' is not supported over REST")


# --------------------------------------------------------------------------- reply → JSON
def to_json(value: Any, base64_encoding: bool) -> Any:
    """A parsed Redis reply as JSON: strings decoded (or base64-encoded), ints, None and lists as they are."""
    if isinstance(value, ResponseError):
        return str(value)
    if isinstance(value, _Status) and value == b"OK":
        return "OK"
    if isinstance(value, (bytes, bytearray)):
        if base64_encoding:
            return base64.b64encode(value).decode("ascii")
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [to_json(v, base64_encoding) for v in value]
    return value  # int, float, None


def _entry(value: Any, base64_encoding: bool) -> dict:
    if isinstance(value, (ResponseError, CommandError)):
        return {"error": str(value)}
    return {"result": to_json(value, base64_encoding)}


# --------------------------------------------------------------------------- execution
class RedisExecutor:
    """Sends raw commands to Redis over pooled connections and returns raw parsed replies.

    Redis errors come back as :class:`ResponseError` instances in the reply list (never raised), so one
    failing command in a pipeline does not hide the others' results.
    """

    def __init__(self, redis_url: str) -> None:
        self.pool = redis.ConnectionPool.from_url(
            redis_url, protocol=2, parser_class=_StatusAwareParser, socket_timeout=60, socket_connect_timeout=5
        )

    def run(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one round trip and read one reply per command.

        A connection that fails while *sending* is replaced and the send retried once (nothing ran yet);
        a failure while reading is raised, since the commands may have run.
        """
        packed: list[bytes] | None = None
        for attempt in (1, 2):
            conn = self.pool.get_connection()
            try:
                packed = packed or conn.pack_commands([list(c) for c in commands])
                try:
                    conn.send_packed_command(packed)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    conn.disconnect()
                    if attempt == 2:
                        raise
                    continue
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as err:
                        replies.append(err)
                    except BaseException:
                        conn.disconnect()
                        raise
                return replies
            finally:
                self.pool.release(conn)
        raise AssertionError("unreachable")

    def transaction(self, commands: Sequence[Command]) -> list[Any] | ResponseError:
        """MULTI … EXEC on one connection: the per-command replies, or the EXECABORT error."""
        replies = self.run([[b"MULTI"], *commands, [b"EXEC"]])
        queue_errors = [r for r in replies[1:-1] if isinstance(r, ResponseError)]
        exec_reply = replies[-1]
        if isinstance(exec_reply, ResponseError):
            return ResponseError(f"{exec_reply} ({queue_errors[0]})" if queue_errors else str(exec_reply))
        return list(exec_reply) if exec_reply is not None else ResponseError("EXECABORT transaction aborted")

    def close(self) -> None:
        """Close every pooled connection."""
        self.pool.disconnect()


# --------------------------------------------------------------------------- fault modes
DROP, LOSE, HOLD = "drop", "lose", "hold"


@dataclass(frozen=True)
class FaultRates:
    """Per-request probabilities (their sum at most 1) of each fault, and how long a held reply waits."""

    drop: float = 0.0
    lose: float = 0.0
    hold: float = 0.0
    hold_seconds: float = 5.0

    def __post_init__(self) -> None:
        rates = (self.drop, self.lose, self.hold)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("fault rates must each lie in [0, 1] and add up to at most 1")
        if not 0.0 <= self.hold_seconds <= 600.0:
            raise ValueError("hold_seconds must lie in [0, 600]")


class Faults:
    """Switchable, seeded-probability faults of the front's command requests (thread-safe).

    ``set(drop=…, lose=…, hold=…, hold_seconds=…)`` switches them on, ``off()`` off; ``counts`` says how many
    requests were served and how many got each fault. The same seed and request order give the same draws.
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rates = FaultRates()
        self.counts: Counter = Counter()

    def set(self, **rates: float) -> None:
        with self._lock:
            self.rates = FaultRates(**rates)

    def off(self) -> None:
        self.set()

    def draw(self) -> tuple[str | None, float]:
        """The fault for the next request (``None``: serve it normally), counted, with the hold time."""
        with self._lock:
            rates = self.rates
            roll = self._rng.random()
            self.counts["requests"] += 1
            for name, rate in ((DROP, rates.drop), (LOSE, rates.lose), (HOLD, rates.hold)):
                if roll < rate:
                    self.counts[name] += 1
                    return name, rates.hold_seconds
                roll -= rate
            return None, 0.0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def _hang_up() -> Response:
    """Close the client's connection without an answer (the server then writes into a closed socket,
    which werkzeug treats as a dropped connection)."""
    sock = request.environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return Response(b"", 502)


def _with_faults(faults: Faults, serve: Callable[[], Response]) -> Response:
    fault, hold_seconds = faults.draw()
    if fault == DROP:
        return _hang_up()
    answer = serve()
    if fault == LOSE:
        return _hang_up()
    if fault == HOLD:
        time.sleep(hold_seconds)
    return answer


# --------------------------------------------------------------------------- Flask app
def _reply(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _authorized(token: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else request.args.get("_token", "")
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def create_app(redis_url: str, token: str, faults: Faults | None = None) -> Flask:
    """Flask app serving Upstash's REST API over the Redis at ``redis_url``, guarded by ``token``; command
    requests go through ``faults`` (none injected unless switched on)."""
    app = Flask("upstash_front")
    executor = RedisExecutor(redis_url)
    faults = faults if faults is not None else Faults()
    app.extensions["upstash_executor"] = executor
    app.extensions["upstash_faults"] = faults

    def b64() -> bool:
        return request.headers.get("Upstash-Encoding", "").lower() == "base64"

    @app.before_request
    def require_token() -> Response | None:
        return None if _authorized(token) else _reply({"error": "Unauthorized"}, 401)

    @app.errorhandler(CommandError)
    def command_error(err: CommandError) -> Response:
        return _reply({"error": str(err)}, 400)

    @app.errorhandler(redis.exceptions.RedisError)
    def redis_down(err: redis.exceptions.RedisError) -> Response:
        return _reply({"error": f"ERR redis unavailable: {type(err).__name__}"}, 503)

    def single(command: Command) -> Response:
        check_command(command)

        def serve() -> Response:
            (reply,) = executor.run([command])
            entry = _entry(reply, b64())
            return _reply(entry, 400 if "error" in entry else 200)
        return _with_faults(faults, serve)

    @app.post("/")
    def json_command() -> Response:
        return single(_json_command(_json_body()))

    def command_list() -> list[Command]:
        body = _json_body()
        if not isinstance(body, list) or not body:
            raise CommandError("ERR the body must be a non-empty JSON array of commands")
        return [_json_command(c) for c in body]

    @app.post("/pipeline")
    def pipeline() -> Response:
        replies: list[Any] = []
        runnable: list[Command] = []
        for cmd in command_list():
            try:
                check_command(cmd)
                runnable.append(cmd)
                replies.append(None)
            except CommandError as err:  # refused commands answer in place; the others still run
                replies.append(err)

        def serve() -> Response:
            results = iter(executor.run(runnable) if runnable else [])
            answers = [r if isinstance(r, CommandError) else next(results) for r in replies]
            return _reply([_entry(r, b64()) for r in answers])
        return _with_faults(faults, serve)

    @app.post("/multi-exec")
    def multi_exec() -> Response:
        commands = command_list()
        for cmd in commands:
            check_command(cmd)

        def serve() -> Response:
            replies = executor.transaction(commands)
            if isinstance(replies, ResponseError):
                return _reply({"error": str(replies)}, 400)
            return _reply([_entry(r, b64()) for r in replies])
        return _with_faults(faults, serve)

    @app.route("/<path:_command>", methods=["GET", "POST", "PUT"])
    def path_command(_command: str) -> Response:
        return single(_path_command())

    return app


class UpstashFront:
    """:func:`create_app` served on a free loopback port from a background thread.

    ``url`` and ``token`` are what ``UPSTASH_REDIS_REST_URL`` / ``UPSTASH_REDIS_REST_TOKEN`` would hold;
    ``faults`` (seeded by ``fault_seed``) switches the fault modes on and off.
    """

    def __init__(self, redis_url: str, token: str = "local-upstash-token", port: int = 0,
                 fault_seed: int = 0) -> None:
        self.redis_url = redis_url
        self.token = token
        self.faults = Faults(fault_seed)
        self.app = create_app(redis_url, token, self.faults)
        self._server = BackgroundServer(self.app, port, name="upstash-front")
        self.port = self._server.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self._server.url

    def stop(self) -> None:
        """Stop serving and close the Redis connections."""
        self._server.stop()
        self.app.extensions["upstash_executor"].close()

    def __enter__(self) -> UpstashFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

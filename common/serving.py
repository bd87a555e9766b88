"""The fleet's gunicorn worker class: slow clients cannot pin a server, and its health routes always answer.

gunicorn 27's ``gthread`` worker hands each connection to a pool the size of ``threads``; the thread waits up to
5 s for the first bytes, then reads the request line, the headers and the body with no timeout at all. N clients
that drip a byte now and then hold all N threads, and ``/health`` waits behind them until the orchestrator
restarts a healthy process (review #15; #11 for the same starvation by long requests). ``DeadlineWorker``:

- **One deadline per request.** Request line, headers and body must arrive within ``read_timeout`` seconds
  (``HTTP_READ_TIMEOUT_SECONDS``), counted from when the connection is first served (or, on a kept-alive
  connection, when the next request begins). Every ``recv`` gets only what remains of it, so a byte every
  second buys nothing. At the deadline the client gets a JSON 408 and the connection is closed.
- **Reading is not serving.** Each connection is read by a thread of its own (the pool holds one per
  connection, up to gunicorn's ``worker_connections``), and the body is read up to the app's own limit
  (Flask's ``MAX_CONTENT_LENGTH``, + 1 byte so the app can still answer 413) before the app sees the request.
  A slow body therefore never occupies the app, nor, through the router, an upstream worker. A body without
  ``Content-Length`` (chunked) that goes past the limit is refused here with a JSON 413: werkzeug would hand
  the app such a stream cut at the limit, without an error, and the router would forward it truncated.
- **The app's concurrency is bounded separately.** At most ``threads`` requests run in the app at once;
  requests for ``health_paths`` skip that bound, so neither load nor slow clients make a process look dead.
- **Connections are closed where they were served.** A closing connection lingers up to 2 s to drain unread
  input (RFC 9112 §9.6); gunicorn does that on its main loop, where one dripping client stalls every accept.
  It happens on the connection's own thread here.

It relies on gunicorn 27.0's gthread internals (``handle``, ``handle_request``, ``_keepalive_after``,
``finish_request``, the parser's ``unreader.sock``), pinned in requirements.txt; tests/security/
test_slow_clients.py exercises each point against the real servers.
"""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http.body import Body
from gunicorn.workers.gthread import _DEFER, DEFAULT_WORKER_DATA_TIMEOUT, ThreadWorker

from common.logs import current_format

#: Body bytes read ahead when the app states no limit of its own (every fleet app does: create_base_app).
DEFAULT_MAX_BODY = 1024 * 1024
#: Readiness and liveness (``create_base_app``): answered outside the app's bound on every server.
PROBE_PATHS = ("/health", "/live")


class RequestTimeout(Exception):
    """The request (line, headers and body) did not arrive within the read deadline."""


class BodyTooLarge(Exception):
    """A body without Content-Length went past the app's limit."""


def _json_answer(status: str, error: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the fleet's JSON error body."""
    body = json.dumps({"success": False, "error": error}).encode()
    return (b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status.encode(), len(body), body))


class _DeadlineSocket:
    """What gunicorn's parser reads from: the connection's socket, each ``recv`` bounded by what remains of the
    current request's deadline. Writes go to the socket itself (blocking, as gunicorn has them)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.deadline = 0.0

    def recv(self, size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout()
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size)
        except TimeoutError:
            raise RequestTimeout() from None
        finally:
            self._sock.settimeout(None)

    # gunicorn's body drain (parser.finish_body) bounds its own reads through these
    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)


class _ReadAhead:
    """A body reader: the bytes already read, then whatever the original body still holds (nothing, unless the
    body is over the app's limit; the app answers 413 and gunicorn drains or drops the rest)."""

    def __init__(self, head: bytes, rest: Body):
        self._head = io.BytesIO(head)
        self._rest = rest

    def read(self, size: int) -> bytes:
        return self._head.read(size) or self._rest.read(size)


class DeadlineWorker(ThreadWorker):
    """gthread with a total read deadline, read-ahead bodies and health routes outside the app's bound.
    Configure it with :func:`deadline_worker`."""

    read_timeout: float = 10.0
    health_paths: frozenset[str] = frozenset(PROBE_PATHS)

    def init_process(self) -> None:
        self._app_slots = threading.BoundedSemaphore(self.cfg.threads)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        config: Any = getattr(self.wsgi, "config", None) or {}
        self._max_body = int(config.get("MAX_CONTENT_LENGTH") or DEFAULT_MAX_BODY)

    def get_thread_pool(self) -> ThreadPoolExecutor:
        """One thread per open connection: a connection being read never waits for a thread."""
        return ThreadPoolExecutor(max_workers=self.cfg.worker_connections, thread_name_prefix="conn")

    def handle(self, conn: Any) -> Any:
        if getattr(conn, "read_deadline", None) is None:
            conn.read_deadline = time.monotonic() + self.read_timeout
        result = self._read_and_serve(conn)
        if result is _DEFER:
            return result
        conn.read_deadline = None  # the next request on a kept-alive connection gets a deadline of its own
        if not result:
            util.close_graceful(conn.sock)  # here, not on the main loop (finish_request sees it closed)
        return result

    def _read_and_serve(self, conn: Any) -> Any:
        if not conn.initialized:
            if not conn.data_ready:
                remaining = conn.read_deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if not conn.wait_for_data(min(DEFAULT_WORKER_DATA_TIMEOUT, remaining)):
                    return _DEFER  # nothing sent yet: wait on gunicorn's poller, without a thread
            conn.init()
            conn.parser.unreader.sock = _DeadlineSocket(conn.parser.unreader.sock)
        conn.parser.unreader.sock.deadline = conn.read_deadline
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> bool:
        self._read_body(req, conn)
        if req.path in self.health_paths:
            return super().handle_request(req, conn)
        with self._app_slots:
            return super().handle_request(req, conn)

    def _read_body(self, req: Any, conn: Any) -> None:
        """Read the body (up to the app's limit + 1 byte) under the request's deadline, before the app runs."""
        if req._expected_100_continue:  # the client sends the body only after this
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            req._expected_100_continue = False
        head = req.body.read(self._max_body + 1)
        if len(head) > self._max_body and all(name != "CONTENT-LENGTH" for name, _ in req.headers):
            raise BodyTooLarge()  # a declared length over the limit is the app's 413, without reading on
        req.body = Body(_ReadAhead(head, req.body))

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """After the answer, draining an unread body past the deadline means closing, never a 408."""
        try:
            return super()._keepalive_after(conn, keepalive)
        except RequestTimeout:
            return False

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, RequestTimeout):
            self.log.warning("request from %s not received within %g s (HTTP_READ_TIMEOUT_SECONDS): 408, closed",
                             (addr or ("?",))[0], self.read_timeout)
            answer = _json_answer("408 Request Timeout", "request not received in time")
        elif isinstance(exc, BodyTooLarge):
            answer = _json_answer("413 Request Entity Too Large",
                                  f"request body is larger than {self._max_body} bytes")
        else:
            super().handle_error(req, client, addr, exc)
            return
        try:
            util.write_nonblock(client, answer)
        except OSError:
            pass

    def finish_request(self, conn: Any, fs: Any) -> None:
        if conn.sock.fileno() == -1:  # closed by handle() on the connection's thread
            self.nr_conns -= 1
            return
        super().finish_request(conn, fs)


def deadline_worker(*, read_timeout: float, health_paths: Iterable[str] = PROBE_PATHS) -> type[DeadlineWorker]:
    """A :class:`DeadlineWorker` with these settings, for gunicorn's ``worker_class`` option."""
    return type("DeadlineWorker", (DeadlineWorker,),
                {"read_timeout": float(read_timeout), "health_paths": frozenset(health_paths)})


class GunicornLogger(Logger):
    """gunicorn's logger; with ``LOG_FORMAT=json`` its lines go through the root handler (``common.logs``)
    instead of gunicorn's own text handler on stderr, so that every line of the process is JSON."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if current_format() != "json":
            return
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


class _Gunicorn(BaseApplication):
    def __init__(self, factory: Callable[[], Any], options: dict[str, Any]):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


def serve(factory: Callable[[], Any], *, host: str, port: int, threads: int, name: str, read_timeout: float,
          health_paths: Iterable[str] = PROBE_PATHS, graceful_timeout: float = 30.0) -> None:
    """Run until SIGTERM (gunicorn's own graceful stop: in-flight requests finish, up to ``graceful_timeout``)."""
    _Gunicorn(factory, {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": deadline_worker(read_timeout=read_timeout, health_paths=health_paths),
        "threads": threads,
        "graceful_timeout": int(graceful_timeout),
        "timeout": 60,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": name,
        "preload_app": False,
        "control_socket_disable": True,
        "logger_class": GunicornLogger,
    }).run()

"""Is the HTTP client still there? A non-streaming request's thread waits for the engine without writing a
byte, so a client that gives up (playground-chat at 45 s, the WAN enhancer at 20 s) would otherwise keep its
row decoding to ``max_tokens``. The waiting thread peeks at the request's socket each wait slice.

The socket is the WSGI server's: ``gunicorn.socket`` (gunicorn sets it in every worker's environ) or
``werkzeug.socket`` (the development server the tests use). While the app handles a request nobody else
reads that socket, so a peek is safe: readable with zero bytes (EOF) or a reset means the client closed its
side; readable with data is a pipelined next request, not a disconnect. (A client that half-closes its
sending side right after its request, legal but rare, reads as gone too.)
"""
from __future__ import annotations

import select
import socket
from collections.abc import Callable, Mapping
from typing import Any


class ClientGone(Exception):
    """The client closed its connection while its request waited: stop working on it (HTTP 499)."""


def disconnect_check(environ: Mapping[str, Any]) -> Callable[[], None] | None:
    """A ``check`` for ``Engine.wait`` that raises ``ClientGone`` once the request's client has disconnected;
    None when the server does not expose the socket."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return None

    def check() -> None:
        if peer_closed(sock):
            raise ClientGone("the client closed the connection")
    return check


def peer_closed(sock: socket.socket) -> bool:
    """Whether the other end of ``sock`` has closed it (never blocks, never consumes a byte)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):   # reset by the peer, or closed under us
        return True

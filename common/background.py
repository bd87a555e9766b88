"""A WSGI app served on loopback from a daemon thread: the orchestrator's status page, and tests' servers.

Not for the public ports (those run under gunicorn, common/serving.py): werkzeug's threaded server has no
read deadline, so only loopback callers that the fleet trusts should reach it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

LOOPBACK = "127.0.0.1"


class _QuietHandler(WSGIRequestHandler):
    """Request handler that does not log one line per request."""

    def log_request(self, code: Any = "-", size: Any = "-") -> None:  # noqa: D102
        pass


class BackgroundServer:
    """Serve a WSGI app on 127.0.0.1 from a daemon thread (werkzeug, one thread per request).

    ``port=0`` (the default) lets the OS choose; the real port is read back, so there is no race.
    """

    def __init__(self, app: Any, port: int = 0, *, quiet: bool = True, name: str = "loopback-http") -> None:
        handler = _QuietHandler if quiet else None
        if quiet:
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server: BaseWSGIServer = make_server(LOOPBACK, port, app, threaded=True, request_handler=handler)
        self.port: int = int(self._server.server_port)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43121`` (no trailing slash)."""
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        """Stop accepting requests and close the listening socket (idempotent)."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._thread = None

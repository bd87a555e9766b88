"""Loopback networking helpers for tests and the demo: free ports; ``BackgroundServer`` (from common/)."""

from __future__ import annotations

import socket

from common.background import LOOPBACK, BackgroundServer

__all__ = ["LOOPBACK", "BackgroundServer", "free_port"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])

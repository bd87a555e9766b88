"""The router's settings: the backends' ports (``common.topology``), the read deadline every server shares, and
its own limits. Parsed once in ``main``."""
from __future__ import annotations

from dataclasses import dataclass

from common.declare import var
from common.parsers import integer, megabytes, number
from common.settings import Serving
from common.topology import Topology


@dataclass(frozen=True)
class RouterSettings(Topology, Serving):
    """Router"""

    timeout_seconds: float = var("ROUTER_TIMEOUT_SECONDS", number(0.1, 7200), 600.0,
                                 "how long a forwarded request may take (504 after)")
    connect_timeout_seconds: float = var("ROUTER_CONNECT_TIMEOUT_SECONDS", number(0.05, 60), 3.0,
                                         "connect timeout to a backend (502 after)")
    max_body_bytes: int = var("ROUTER_MAX_BODY_MB", megabytes(0.001, 4096), 16 * 1024 * 1024,
                              "body limit in MiB (413 above)", shown="16")
    threads: int = var("ROUTER_THREADS", integer(1, 256), 16,
                       "requests the router forwards at once (connections still being read and the health routes "
                       "do not count)")

"""The router's settings: the backends' ports (``common.topology``), the read deadline every server shares, and
its own limits; for the ops page (router/ops.py) the admin key, the queue connection and the orchestrator's status
port. Parsed once in ``main``."""
from __future__ import annotations

from dataclasses import dataclass

from common.declare import var
from common.parsers import integer, megabytes, number
from common.settings import AdminKey, Logs, QueueConnection, Serving
from common.topology import StatusPort, Topology


@dataclass(frozen=True)
class RouterSettings(Topology, StatusPort, Serving, Logs, AdminKey, QueueConnection):
    """Router"""

    timeout_seconds: float = var(
        "ROUTER_TIMEOUT_SECONDS", number(0.1, 7200), 90.0,
        "how long a forwarded request may take (504 after); below the RunPod proxy's 100 s, so the client gets "
        "the router's JSON 504 rather than the proxy's cut")
    connect_timeout_seconds: float = var("ROUTER_CONNECT_TIMEOUT_SECONDS", number(0.05, 60), 3.0,
                                         "connect timeout to a backend (502 after)")
    max_body_bytes: int = var("ROUTER_MAX_BODY_MB", megabytes(0.001, 4096), 16 * 1024 * 1024,
                              "body limit in MiB (413 above)", shown="16")
    threads: int = var("ROUTER_THREADS", integer(1, 256), 16,
                       "requests the router forwards at once (connections still being read and the health routes "
                       "do not count)")
    ops_collect_seconds: float = var(
        "OPS_COLLECT_SECONDS", number(0, 300), 5.0,
        "how often the ops page's collector asks the memory manager, the orchestrator, the chat worker and Redis "
        "(2 Redis commands a round); history is kept for an hour in memory; 0 = no collector")

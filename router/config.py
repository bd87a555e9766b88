"""The router's settings: the backends' ports (common.topology) and its own limits. Parsed once in ``main``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from common.settings import Reader
from common.topology import Topology


@dataclass(frozen=True)
class RouterSettings:
    topology: Topology = field(default_factory=Topology)
    timeout_seconds: float = 600.0
    connect_timeout_seconds: float = 3.0
    max_body_bytes: int = 16 * 1024 * 1024
    threads: int = 16
    read_timeout_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "RouterSettings":
        r = Reader(env)
        return cls(
            topology=Topology.from_env(env),
            timeout_seconds=r.number("ROUTER_TIMEOUT_SECONDS", 600.0, 0.1, 7200),
            connect_timeout_seconds=r.number("ROUTER_CONNECT_TIMEOUT_SECONDS", 3.0, 0.05, 60),
            max_body_bytes=int(r.number("ROUTER_MAX_BODY_MB", 16, 0.001, 4096) * 1024 * 1024),
            threads=int(r.number("ROUTER_THREADS", 16, 1, 256)),
            read_timeout_seconds=r.number("HTTP_READ_TIMEOUT_SECONDS", 10.0, 0.5, 600),
        )

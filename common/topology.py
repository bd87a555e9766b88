"""The fleet's topology: which programs exist, in which order they start, and the loopback port of each.

Every process that must reach another (the router its backends, the memory manager the workers, the
orchestrator everyone) reads the ports from here, so that a port set once (``SDXL_PORT=…``) is seen by all.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.declare import Declared, each, var
from common.errors import ConfigError
from common.parsers import integer

#: Every program the orchestrator knows, in start order (stop order is the reverse).
#: ``registration`` starts right after the router: it only polls the others' ``/health``, so it need not wait
#: for a model to load, and announces the router as soon as a backend answers.
PROGRAM_ORDER = ("memory_manager", "router", "registration", "sdxl", "chat", "wan")
MODEL_WORKERS = ("sdxl", "chat", "wan")
DEFAULT_PORTS = {"memory_manager": 7870, "router": 7860, "registration": 7872, "sdxl": 7859, "chat": 7861,
                 "wan": 7862}
PORT_VARIABLES = {"memory_manager": "MEMORY_MANAGER_PORT", "router": "ROUTER_PORT",
                  "registration": "REGISTRATION_PORT", "sdxl": "SDXL_PORT", "chat": "CHAT_PORT", "wan": "WAN_PORT"}


@dataclass(frozen=True)
class Topology(Declared):
    """Ports"""

    ports: Mapping[str, int] = each(PORT_VARIABLES, integer(1, 65535), DEFAULT_PORTS,
                                    "loopback port of <key>")

    def _check(self) -> None:
        if len(set(self.ports.values())) != len(self.ports):
            raise ConfigError(", ".join(PORT_VARIABLES.values()) + " must differ")

    def url(self, program: str) -> str:
        """Loopback base URL of a program (every program listens on 127.0.0.1)."""
        return f"http://127.0.0.1:{self.ports[program]}"


@dataclass(frozen=True)
class StatusPort(Declared):
    """Orchestrator status"""

    status_port: int = var("ORCHESTRATOR_STATUS_PORT", integer(0, 65535), 7871,
                           "loopback status port of the orchestrator (`python -m orchestrator status`, the router's "
                           "ops page); 0 = off")

"""The fleet's topology: which programs exist, in which order they start, and the loopback port of each.

Every process that must reach another (the router its backends, the memory manager the workers, the
orchestrator everyone) reads the ports from here, so that a port set once (``SDXL_PORT=…``) is seen by all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, TypeVar

from common.errors import ConfigError
from common.settings import Reader

T = TypeVar("T")

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
class Topology:
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Topology":
        r = Reader(env)
        ports = {name: int(r.number(PORT_VARIABLES[name], DEFAULT_PORTS[name], 1, 65535)) for name in PROGRAM_ORDER}
        if len(set(ports.values())) != len(ports):
            raise ConfigError(", ".join(PORT_VARIABLES.values()) + " must differ")
        return cls(ports)

    def url(self, program: str) -> str:
        """Loopback base URL of a program (every program listens on 127.0.0.1)."""
        return f"http://127.0.0.1:{self.ports[program]}"


def pairs(r: Reader, name: str, keys: tuple[str, ...], parse: Callable[[str], T],
          expected: str) -> dict[str, T]:
    """``"sdxl:0,chat:1"`` → ``{"sdxl": 0, "chat": 1}``; keys from ``keys``, values through ``parse``."""
    raw = r.raw(name)
    if raw is None:
        return {}
    result: dict[str, T] = {}
    for item in raw.split(","):
        key, sep, value = item.strip().partition(":")
        key = key.strip().lower()
        if not sep or key not in keys:
            raise ConfigError(f"{name} must be a list like {keys[0]}:<value>,... with names from {', '.join(keys)}")
        try:
            result[key] = parse(value.strip())
        except (ValueError, TypeError):
            raise ConfigError(f"{name}: the value for {key} must be {expected}") from None
    return result

"""Fleet settings: what the orchestrator runs, on which ports and GPUs, and how it supervises.

Parsed once at the edge (``FleetSettings.from_env(os.environ)``) with the same reader as
``common.settings.Settings``: a bad value raises ``ConfigError`` naming the variable, never its value.
Every variable is documented in README.md ("Settings").
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, TypeVar

from common.errors import ConfigError
from common.settings import Reader
from common.topology import MODEL_WORKERS, PROGRAM_ORDER, Topology, pairs

T = TypeVar("T")

#: Seconds a program may take from spawn to its first ``/health`` 200 (models load in minutes).
DEFAULT_START_TIMEOUTS = {"memory_manager": 30.0, "router": 30.0, "registration": 30.0, "sdxl": 900.0, "chat": 900.0,
                          "wan": 900.0}


@dataclass(frozen=True)
class FleetSettings:
    programs: tuple[str, ...] = PROGRAM_ORDER
    ports: Mapping[str, int] = field(default_factory=lambda: dict(Topology().ports))
    status_port: int = 7871
    # GPU placement
    gpu_count: int | None = None
    gpu_placement: Mapping[str, int] = field(default_factory=dict)
    # Supervision
    start_timeouts: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_START_TIMEOUTS))
    stop_grace_seconds: float = 90.0
    kill_after_seconds: float = 10.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    max_quick_failures: int = 5
    stable_seconds: float = 60.0
    health_interval_seconds: float = 10.0
    unhealthy_restart_checks: int = 6  # failed /health checks in a row before a RUNNING program is restarted
    commands: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    python: str = "python3"
    # Logs
    log_dir: Path = Path("var/log")
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str], python: str = "python3") -> "FleetSettings":
        r = Reader(env)
        programs = _program_list(r.text("FLEET_PROGRAMS", ",".join(PROGRAM_ORDER)))
        ports = Topology.from_env(env).ports
        gpu_count = r.raw("GPU_COUNT")
        settings = cls(
            programs=programs,
            ports=ports,
            status_port=int(r.number("ORCHESTRATOR_STATUS_PORT", 7871, 0, 65535)),
            gpu_count=None if gpu_count is None else int(r.number("GPU_COUNT", 0, 0, 64)),
            gpu_placement=pairs(r, "GPU_PLACEMENT", MODEL_WORKERS, lambda v: int(_ranged(float(v), 0, 63)),
                                 "a GPU index"),
            start_timeouts={**DEFAULT_START_TIMEOUTS,
                            **pairs(r, "FLEET_START_TIMEOUTS", PROGRAM_ORDER, lambda v: _ranged(float(v), 1, 86400),
                                     "seconds (1 to 86400)")},
            stop_grace_seconds=r.number("FLEET_STOP_GRACE_SECONDS", 90.0, 0, 3600),
            kill_after_seconds=r.number("FLEET_KILL_AFTER_SECONDS", 10.0, 0, 600),
            backoff_base_seconds=r.number("FLEET_BACKOFF_BASE_SECONDS", 1.0, 0.01, 600),
            backoff_max_seconds=r.number("FLEET_BACKOFF_MAX_SECONDS", 60.0, 0.01, 3600),
            max_quick_failures=int(r.number("FLEET_MAX_QUICK_FAILURES", 5, 1, 1000)),
            stable_seconds=r.number("FLEET_STABLE_SECONDS", 60.0, 0, 86400),
            health_interval_seconds=r.number("FLEET_HEALTH_INTERVAL_SECONDS", 10.0, 0.05, 3600),
            unhealthy_restart_checks=int(r.number("FLEET_UNHEALTHY_RESTART_CHECKS", 6, 0, 100000)),
            commands={name: _command(r, name) for name in PROGRAM_ORDER if r.raw(_command_variable(name))},
            python=python,
            log_dir=r.path("LOG_DIR") or Path("var/log"),
            log_max_bytes=int(r.number("LOG_MAX_BYTES", 10 * 1024 * 1024, 1024, 1 << 40)),
            log_backups=int(r.number("LOG_BACKUPS", 5, 0, 1000)),
        )
        if settings.backoff_base_seconds > settings.backoff_max_seconds:
            raise ConfigError("FLEET_BACKOFF_BASE_SECONDS must not exceed FLEET_BACKOFF_MAX_SECONDS")
        if settings.status_port in ports.values():
            raise ConfigError("ORCHESTRATOR_STATUS_PORT must differ from the programs' ports")
        return settings

    def url(self, program: str) -> str:
        """Loopback base URL of a program (every program listens on 127.0.0.1)."""
        return f"http://127.0.0.1:{self.ports[program]}"


def _command_variable(program: str) -> str:
    return f"FLEET_COMMAND_{program.upper()}"


def _command(r: Reader, program: str) -> tuple[str, ...]:
    name = _command_variable(program)
    try:
        words = tuple(shlex.split(r.raw(name) or ""))
    except ValueError:
        raise ConfigError(f"{name} must be a shell-style command line") from None
    if not words:
        raise ConfigError(f"{name} must name a program")
    return words


def _program_list(value: str) -> tuple[str, ...]:
    aliases = {"memory": "memory_manager", "memory-manager": "memory_manager"}
    names = {aliases.get(n.strip().lower(), n.strip().lower()) for n in value.split(",") if n.strip()}
    unknown = sorted(names - set(PROGRAM_ORDER))
    if unknown:
        raise ConfigError("FLEET_PROGRAMS must list names from " + ", ".join(PROGRAM_ORDER)
                          + f" (unknown: {', '.join(unknown)})")
    return tuple(name for name in PROGRAM_ORDER if name in names)


def _ranged(value: float, lo: float, hi: float) -> float:
    if not lo <= value <= hi:
        raise ValueError
    return value

"""The orchestrator's settings: what it runs, on which ports and GPUs, and how it supervises
(``FleetSettings``); and the few worker settings its start-up checks read (``StartupSettings``).

Parsed once at the edge (``FleetSettings.from_env(os.environ)``): a bad value raises ``ConfigError`` naming the
variable, never its value. README.md's "Settings" tables are generated from these declarations.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.declare import each, var
from common.errors import ConfigError
from common.parsers import Invalid, Parser, command, integer, number, pairs, path
from common.settings import AdminKey, ChatModels, GpuCount, Logs, QueueConnection, SdxlModel, WanModel
from common.topology import MODEL_WORKERS, PROGRAM_ORDER, StatusPort, Topology

#: Seconds a program may take from spawn to its first ``/health`` 200 (models load in minutes).
DEFAULT_START_TIMEOUTS = {"memory_manager": 30.0, "router": 30.0, "registration": 30.0, "sdxl": 900.0, "chat": 900.0,
                          "wan": 900.0}
_ALIASES = {"memory": "memory_manager", "memory-manager": "memory_manager"}


def _program_list(value: str) -> tuple[str, ...]:
    names = {_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in value.split(",") if n.strip()}
    unknown = sorted(names - set(PROGRAM_ORDER))
    if unknown:
        raise Invalid("{name} must list names from " + ", ".join(PROGRAM_ORDER))
    return tuple(name for name in PROGRAM_ORDER if name in names)


@dataclass(frozen=True)
class FleetSettings(Topology, StatusPort, GpuCount, Logs):
    """Orchestrator"""

    programs: tuple[str, ...] = var("FLEET_PROGRAMS", Parser(_program_list, "a list of programs"), PROGRAM_ORDER,
                                    "what to run (start order is fixed)")
    gpu_placement: Mapping[str, int] = var(
        "GPU_PLACEMENT", pairs(MODEL_WORKERS, integer(0, 63)), {},
        "e.g. `sdxl:0,chat:1,wan:1` (sets each child's `CUDA_VISIBLE_DEVICES`)", shown="round-robin SDXL, chat, WAN")
    start_timeouts: Mapping[str, float] = var(
        "FLEET_START_TIMEOUTS", pairs(PROGRAM_ORDER, number(1, 86400), DEFAULT_START_TIMEOUTS), DEFAULT_START_TIMEOUTS,
        "seconds from spawn to the first `/health` 200, e.g. `wan:1200`",
        shown="30 s (memory manager, router, registration), 900 s (workers)")
    stop_grace_seconds: float = var("FLEET_STOP_GRACE_SECONDS", number(0, 3600), 90.0,
                                    "warm-stop grace (the workers get it as `WORKER_STOP_GRACE_SECONDS`)")
    kill_after_seconds: float = var("FLEET_KILL_AFTER_SECONDS", number(0, 600), 10.0,
                                    "wait after the cold stop before SIGKILL")
    backoff_base_seconds: float = var("FLEET_BACKOFF_BASE_SECONDS", number(0.01, 600), 1.0,
                                      "first restart delay (doubling)")
    backoff_max_seconds: float = var("FLEET_BACKOFF_MAX_SECONDS", number(0.01, 3600), 60.0, "longest restart delay")
    max_quick_failures: int = var("FLEET_MAX_QUICK_FAILURES", integer(1, 1000), 5, "quick failures before FATAL")
    stable_seconds: float = var("FLEET_STABLE_SECONDS", number(0, 86400), 60.0,
                                "a run this long resets the quick-failure count")
    health_interval_seconds: float = var("FLEET_HEALTH_INTERVAL_SECONDS", number(0.05, 3600), 10.0,
                                         "health checks (status page, unhealthy restarts)")
    unhealthy_restart_checks: int = var(
        "FLEET_UNHEALTHY_RESTART_CHECKS", integer(0, 100000), 6,
        "failed `/live` checks in a row (no answer in 2 s or not 200) before a RUNNING program is restarted the way "
        "a shutdown stops it (warm, cold, SIGKILL), then the normal backoff; `/health` (readiness) never restarts "
        "anything; 0 = never")
    commands: Mapping[str, tuple[str, ...]] = each(
        {name: f"FLEET_COMMAND_{name.upper()}" for name in PROGRAM_ORDER}, command(), {},
        "replace <key>'s command line (`{python}`, `{port}` filled in)")
    log_dir: Path = var("LOG_DIR", path(), Path("var/log"), "rotating log files' folder")
    log_max_bytes: int = var("LOG_MAX_BYTES", integer(1024, 1 << 40), 10 * 1024 * 1024, "size of a log file",
                             shown="10 MiB")
    log_backups: int = var("LOG_BACKUPS", integer(0, 1000), 5, "rotated log files kept")
    python: str = "python3"

    def _check(self) -> None:
        if self.backoff_base_seconds > self.backoff_max_seconds:
            raise ConfigError("FLEET_BACKOFF_BASE_SECONDS must not exceed FLEET_BACKOFF_MAX_SECONDS")
        if self.status_port in self.ports.values():
            raise ConfigError("ORCHESTRATOR_STATUS_PORT must differ from the programs' ports")


@dataclass(frozen=True)
class StartupSettings(SdxlModel, WanModel, ChatModels, AdminKey, QueueConnection):
    """What the orchestrator's start-up checks read of the workers' settings: the model paths (a worker without
    one is skipped; one that does not exist is warned about), and the admin key and queue it warns without."""

"""What the orchestrator runs: one :class:`ProgramSpec` per program, commands and environments from settings.

Default commands (``FLEET_COMMAND_<PROGRAM>`` replaces one; ``{python}`` and ``{port}`` in it are filled in)::

    memory_manager  {python} -m memory_manager --port 7870
    router          {python} -m router --port 7860
    registration    {python} -m registration --port 7872   (announces chat and the router to the app)
    sdxl            {python} -m workers sdxl --port 7859
    chat            {python} -m workers chat --port 7861 --host 0.0.0.0   (public: reached via the RunPod proxy)
    wan             {python} -m workers wan --port 7862

Each child gets the orchestrator's environment plus ``PYTHONUNBUFFERED=1``, ``FLEET_PROGRAM=<name>``,
``FLEET_GPU_INDEX`` (the fleet GPU index the memory manager counts it on), ``CUDA_VISIBLE_DEVICES`` from the GPU
placement when there are several GPUs, and — unless the operator set them — ``MEMORY_MANAGER_URL`` /
``CHAT_WORKER_URL`` pointing at the fleet's own ports and ``WORKER_STOP_GRACE_SECONDS`` equal to the
orchestrator's grace period (so a worker's own warm stop and the orchestrator's agree on when to hand back).
The router, the memory manager and registration listen on their ports as shown (the router on 0.0.0.0, the
other two on 127.0.0.1); SDXL and WAN keep the workers' default bind, 127.0.0.1: only the router reaches them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from common.topology import MODEL_WORKERS

from .checks import model_workers_to_skip
from .config import FleetSettings, StartupSettings
from .placement import place
from .program import ProgramSpec

log = logging.getLogger("orchestrator")

DEFAULT_COMMANDS = {
    "memory_manager": ("{python}", "-m", "memory_manager", "--port", "{port}"),
    "router": ("{python}", "-m", "router", "--port", "{port}"),
    "registration": ("{python}", "-m", "registration", "--port", "{port}"),
    "sdxl": ("{python}", "-m", "workers", "sdxl", "--port", "{port}"),
    "chat": ("{python}", "-m", "workers", "chat", "--port", "{port}", "--host", "0.0.0.0"),
    "wan": ("{python}", "-m", "workers", "wan", "--port", "{port}"),
}
#: Shutdown waves: the model workers and registration first (the workers finish their jobs; registration's
#: heartbeat ends with them, the app has no call to unregister), then the router, then the memory manager.
STOP_WAVES = {"router": 1, "memory_manager": 2}
HEALTH_PATHS = {"router": "/router/health"}  # the router's /health waits for a backend; its gate must not


def build_specs(settings: StartupSettings, fleet: FleetSettings, env: Mapping[str, str],
                gpu_count: int) -> list[ProgramSpec]:
    """The programs to run, in start order. Model workers without a model path are skipped (warning)."""
    skipped = model_workers_to_skip(settings, [p for p in fleet.programs if p in MODEL_WORKERS])
    for warning in skipped.values():
        log.warning("startup: %s", warning)
    programs = [p for p in fleet.programs if p not in skipped]
    placement = place([p for p in programs if p in MODEL_WORKERS], gpu_count, fleet.gpu_placement,
                      env.get("CUDA_VISIBLE_DEVICES"))
    base_env = {**env, "PYTHONUNBUFFERED": "1"}
    base_env.setdefault("MEMORY_MANAGER_URL", fleet.url("memory_manager"))
    base_env.setdefault("CHAT_WORKER_URL", fleet.url("chat"))
    base_env.setdefault("WORKER_STOP_GRACE_SECONDS", f"{fleet.stop_grace_seconds:g}")
    specs = []
    for name in programs:
        port = fleet.ports[name]
        child_env = {**base_env, "FLEET_PROGRAM": name}
        where = placement.get(name)
        if where is not None:
            child_env["FLEET_GPU_INDEX"] = str(where.index)
            if where.visible_devices is not None:
                child_env["CUDA_VISIBLE_DEVICES"] = where.visible_devices
            log.info("placement: %s on GPU %d%s", name, where.index,
                     f" (CUDA_VISIBLE_DEVICES={where.visible_devices})" if where.visible_devices else " (shared)")
        template = fleet.commands.get(name, DEFAULT_COMMANDS[name])
        command = tuple(word.replace("{python}", fleet.python).replace("{port}", str(port)) for word in template)
        specs.append(ProgramSpec(name=name, command=command, port=port, env=child_env,
                                 health_path=HEALTH_PATHS.get(name, "/health"),
                                 start_timeout=fleet.start_timeouts[name],
                                 gpu=where.visible_devices if where is not None else None,
                                 stop_wave=STOP_WAVES.get(name, 0)))
    return specs

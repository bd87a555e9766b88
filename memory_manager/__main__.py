"""``python -m memory_manager [--port 7870]``: the memory manager on 127.0.0.1, served by gunicorn.

The policy's tick (pressure sample, dead-worker sweep, predictive reload) runs every MEMORY_TICK_SECONDS in a
thread of the gunicorn worker process, next to the app it shares the ledger with.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from flask import Flask

from common.logs import setup_logging
from common.serving import serve
from common.topology import MODEL_WORKERS

from .app import MemoryDeps, create_app
from .config import MemorySettings
from .control import WorkerControl
from .ledger import Ledger
from .metrics import MemoryMetrics
from .policy import MemoryPolicy, seed_policies
from .probe import make_probe, physical_devices

log = logging.getLogger("memory_manager")


def ticking(policy: MemoryPolicy, seconds: float) -> threading.Thread:
    def loop() -> None:
        while True:
            try:
                policy.tick()
            except Exception:  # noqa: BLE001 - the ticker must outlive one bad tick; the error is logged
                log.exception("memory manager tick failed")
            threading.Event().wait(seconds)

    thread = threading.Thread(target=loop, name="memory-tick", daemon=True)
    thread.start()
    return thread


def build(memory: MemorySettings, visible_devices: str | None) -> Flask:
    workers = seed_policies(memory, {w: memory.url(w) for w in MODEL_WORKERS})
    policy = MemoryPolicy(Ledger(memory.history_size), make_probe(memory, visible_devices), workers,
                          WorkerControl(workers, memory.worker_admin_key, timeout=memory.worker_timeout_seconds),
                          memory)
    ticking(policy, memory.tick_seconds)
    metrics = MemoryMetrics(policy, physical=physical_devices(visible_devices))
    return create_app(MemoryDeps(policy, memory.worker_admin_key, metrics))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memory_manager", description="The fleet's VRAM memory manager.")
    parser.add_argument("--port", type=int, help="listen port on 127.0.0.1 (default MEMORY_MANAGER_PORT, 7870)")
    args = parser.parse_args(argv)
    memory = MemorySettings.for_process(os.environ, "memory_manager")
    setup_logging(logging.INFO, memory.log_format, service="memory_manager")
    if memory.worker_admin_key is None:
        log.warning("WORKER_ADMIN_KEY is not set: reservations and emergency operations are refused")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    serve(lambda: build(memory, visible), host="127.0.0.1",
          port=args.port or memory.ports["memory_manager"], threads=8, name="memory_manager",
          read_timeout=memory.http_read_timeout_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A memory manager's policy for the metrics tests: fixed-capacity GPUs, workers that are never called."""
from __future__ import annotations

from common.settings import Secret
from memory_manager.config import MemorySettings
from memory_manager.control import WorkerControl
from memory_manager.ledger import Ledger
from memory_manager.policy import MemoryPolicy, seed_policies
from memory_manager.probe import FixedProbe

ADMIN = "test-admin-key"


def policy_of(gpus: int = 2) -> MemoryPolicy:
    settings = MemorySettings(worker_admin_key=Secret(ADMIN), gpu_count=gpus, probe="capacity")
    workers = seed_policies(settings, {w: "http://127.0.0.1:9" for w in ("sdxl", "chat", "wan")})
    return MemoryPolicy(Ledger(100), FixedProbe(80.0, gpus), workers,
                        WorkerControl(workers, settings.worker_admin_key, timeout=1.0), settings)

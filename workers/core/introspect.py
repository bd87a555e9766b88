"""What a worker process reports about its machine on ``/memory/status`` and ``/debug/env``: device memory
and library versions. Never fails a route: a broken CUDA runtime reads as "cpu"."""
from __future__ import annotations

import logging
import platform
import sys
from typing import Any

log = logging.getLogger(__name__)


def device_memory() -> dict[str, Any]:
    # A process that never imported torch holds no device memory; importing it just to say so costs seconds of
    # CPU (the memory manager's census asks every worker once, the fake-handler test fleets included).
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return {"type": "cuda", "name": torch.cuda.get_device_name(), "total_gb": round(total / 2**30, 2),
                    "free_gb": round(free / 2**30, 2),
                    "allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 2)}
    except Exception:  # a broken CUDA runtime must not break the status route
        log.exception("CUDA memory query failed")
    return {"type": "cpu"}


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    try:
        import torch
        found["cuda"] = torch.version.cuda
    except ImportError:
        found["cuda"] = None
    return found

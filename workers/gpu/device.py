"""Which torch device a model worker runs on, from the ``DEVICE`` setting.

One resolver for the SDXL, WAN and chat workers, so that ``DEVICE`` means the same in
each. The fleet runs on CUDA; CPU is for tests, the demo and development. Apple's ``mps`` and other backends
are refused: no model path is written or tested for them. torch is imported on the first call, not at import,
so that a module can import this one without paying for torch (the SDXL pipeline module imports torch lazily).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    import torch

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(setting: str | None) -> torch.device:
    """``auto`` (or empty) -> the current CUDA device when one is available, else the CPU; ``cpu``, ``cuda`` and
    ``cuda:N`` as named (case and surrounding spaces ignored). ``ConfigError`` for anything else, and for a CUDA
    device this machine does not have: a worker that cannot use its device must not start."""
    import torch

    name = (setting or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"DEVICE must be {CHOICES}") from None
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"DEVICE must be {CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("DEVICE asks for CUDA but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"DEVICE names a CUDA device this machine does not have (it has "
                              f"{torch.cuda.device_count()}, numbered from 0)")
    return device

"""Checks: the start-up report (warnings, never pins).

The start-up report says what the orchestrator found — settings valid, model paths present, torch build,
GPUs with their free memory — and warns about what looks wrong; only invalid settings stop the fleet.
It never imports torch (that would cost seconds and, with CUDA, a context on the GPU): the torch build comes
from the package metadata and the GPUs from ``nvidia-smi``.
"""
from __future__ import annotations

import importlib.metadata
import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import StartupSettings

log = logging.getLogger("orchestrator")

#: The setting(s) that give each model worker its model; a worker whose settings are all unset is skipped.
MODEL_PATH_SETTINGS: dict[str, tuple[str, ...]] = {
    "sdxl": ("sdxl_model_path",),
    "chat": ("qwen_instruct_path", "qwen_base_path"),
    "wan": ("wan_model_path",),
}
#: Further paths each worker reads that must exist when set.
OPTIONAL_PATH_SETTINGS: dict[str, tuple[str, ...]] = {"sdxl": ("sdxl_config_path",), "wan": ("wan_vace_model_path",)}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_mib: int
    free_mib: int
    driver: str


def detect_gpus(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[Gpu]:
    """The GPUs ``nvidia-smi`` sees (physical order, before any ``CUDA_VISIBLE_DEVICES``), or [] without it."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free,driver_version",
                   "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        log.warning("startup: nvidia-smi is present but did not answer")
        return []
    return parse_nvidia_smi(out.stdout)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit():
            try:
                gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2])), int(float(parts[3])), parts[4]))
            except ValueError:
                continue
    return gpus


def model_workers_to_skip(settings: StartupSettings, workers: Sequence[str]) -> dict[str, str]:
    """Model workers whose model path settings are all unset → the warning to log; they are not started."""
    skipped = {}
    for worker in workers:
        names = MODEL_PATH_SETTINGS.get(worker, ())
        if names and all(getattr(settings, n) is None for n in names):
            variables = " / ".join(StartupSettings.env_of(n) for n in names)
            skipped[worker] = f"{worker} skipped: {variables} is not set"
    return skipped


def startup_report(settings: StartupSettings, workers: Sequence[str], gpus: Sequence[Gpu],
                   gpu_count: int) -> list[str]:
    """Log what was found; return the warnings (each also logged)."""
    warnings: list[str] = []
    for worker in workers:
        for name in MODEL_PATH_SETTINGS.get(worker, ()) + OPTIONAL_PATH_SETTINGS.get(worker, ()):
            path: Path | None = getattr(settings, name)
            if path is not None and not path.exists():
                warnings.append(f"{worker}: {StartupSettings.env_of(name)} does not exist on this machine")
    try:
        torch_version = importlib.metadata.version("torch")
        log.info("startup: torch %s (%s)", torch_version, _torch_build(torch_version))
    except importlib.metadata.PackageNotFoundError:
        warnings.append("torch is not installed: the model workers cannot run")
    for gpu in gpus:
        log.info("startup: GPU %d %s, %.1f GiB total, %.1f GiB free, driver %s", gpu.index, gpu.name,
                 gpu.total_mib / 1024, gpu.free_mib / 1024, gpu.driver)
        if gpu.free_mib < 0.9 * gpu.total_mib:
            warnings.append(f"GPU {gpu.index}: only {gpu.free_mib / 1024:.1f} of {gpu.total_mib / 1024:.1f} GiB "
                            "free before the fleet starts (another process holds memory)")
    if gpu_count == 0:
        warnings.append("no GPU found (nvidia-smi absent or GPU_COUNT=0): the model workers run on CPU")
    if settings.worker_admin_key is None:
        warnings.append("WORKER_ADMIN_KEY is not set: the memory manager cannot unload or reload workers")
    if not settings.redis_configured:
        warnings.append("neither REDIS_URL nor UPSTASH_REDIS_REST_URL/TOKEN is set: workers get no jobs")
    for warning in warnings:
        log.warning("startup: %s", warning)
    return warnings


def _torch_build(version: str) -> str:
    """``2.13.0+cu126`` → CUDA 12.6 build; ``+cpu`` → CPU build; no suffix: CUDA if NVIDIA wheels are installed."""
    _, _, local = version.partition("+")
    if local.startswith("cu") and local[2:].isdigit():
        return f"CUDA {local[2:-1]}.{local[-1]} build"
    if local == "cpu":
        return "CPU build"
    cuda_wheels = any((d.metadata["Name"] or "").startswith("nvidia-cuda-runtime")
                      for d in importlib.metadata.distributions())
    return "CUDA build" if cuda_wheels else "CPU build"

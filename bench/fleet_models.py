"""Model folders for the fleet run: SDXL, WAN T2V and Qwen instruct, random weights, saved as the workers load them.

Each family is built by ``bench.models`` (``bench/configs`` at full size on a GPU; the demo models' configs on
the CPU with ``--tiny``) and written with ``save_pretrained`` (safetensors), as ``bench/load.py`` does, in a
process of its own, all three at once: every build's memory (GPU and host) is gone when its process exits,
and no CUDA context is left in the benchmark's own process.

    python -m bench.fleet_models --model sdxl|wan|qwen --out DIR --demo DEMO [--tiny]

prints one JSON line: ``{"model", "build_s", "save_s", "size_gb", "device"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

MODELS = ("sdxl", "wan", "qwen")
ROOT = Path(__file__).resolve().parents[1]


def folder_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 2)


def build_one(name: str, out: Path, demo: Path, tiny: bool) -> dict:
    """Build ``name`` on this process's device and save it to ``out`` (runs in the child process)."""
    from . import models
    from . import profile as profiles
    from .load import QWEN_TOKENIZER_FILES
    from .measure import sync

    profile = profiles.tiny(demo) if tiny else profiles.full(demo)
    started = time.perf_counter()
    if name == "qwen":
        model, _tokenizer = models.qwen(profile)
        sync(profile.device)
        built = time.perf_counter()
        model.save_pretrained(out)
        for file in QWEN_TOKENIZER_FILES:
            source = profile.tokenizer_path("qwen-instruct") / file
            if source.exists():
                shutil.copy(source, out / file)
    else:
        pipe = models.sdxl(profile) if name == "sdxl" else models.wan(profile)
        sync(profile.device)
        built = time.perf_counter()
        pipe.save_pretrained(out)
    saved = time.perf_counter()
    return {"model": name, "build_s": round(built - started, 1), "save_s": round(saved - built, 1),
            "size_gb": folder_gb(out), "device": str(profile.device)}


def build_all(root: Path, demo: Path, tiny: bool, devices: Mapping[str, str | None], timeout: float,
              log_dir: Path) -> dict[str, dict]:
    """Build every model in parallel processes (``devices``: model → CUDA_VISIBLE_DEVICES, None = inherit).
    Returns model → its JSON line plus ``path`` and ``wall_s``; a failed build → ``{"error": ...}``."""
    started = time.monotonic()
    running = {}
    for name in MODELS:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        if devices.get(name) is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(devices[name])
        command = [sys.executable, "-m", "bench.fleet_models", "--model", name, "--out", str(root / name),
                   "--demo", str(demo)] + (["--tiny"] if tiny else [])
        log = open(log_dir / f"build-{name}.log", "wb")
        running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                          stdin=subprocess.DEVNULL), log)
    results: dict[str, dict] = {}
    for name, (proc, log) in running.items():
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            results[name] = {"error": f"timed out after {timeout:.0f} s"}
            continue
        finally:
            log.close()
        lines = [line for line in stdout.decode(errors="replace").splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (log_dir / f"build-{name}.log").read_text(errors="replace")[-1500:]
            results[name] = {"error": f"exit {proc.returncode}: {tail}"}
            continue
        results[name] = {**json.loads(lines[-1]), "path": str(root / name),
                         "wall_s": round(time.monotonic() - started, 1)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_models")
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demo", type=Path, required=True, help="the demo models folder (tokenizers, tiny configs)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    print(json.dumps(build_one(args.model, args.out, args.demo, args.tiny)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m bench {all,ceilings,sdxl,wan,chat,fp8,load,compile,levers}... [--tiny] [--json PATH] [--deadline S]

Full size (default) needs CUDA: the production architectures from bench/configs with random weights, our
worker code paths next to plain eager diffusers/transformers, same process. ``--tiny`` runs the same code on
the CPU with the demo models' configs (a check of the harness, seconds). The JSON goes to ``--json``, else
``$OUT/bench.json`` when ``OUT`` is set; it is rewritten after every step. The table is printed last.
``python -m bench fleet [--tiny] ...`` (not part of ``all``): the whole fleet on two GPUs, see bench/fleet.py.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("ceilings", "sdxl", "wan", "chat", "fp8", "load", "compile", "levers")
FULL_ALL = SECTIONS[:-1]   # levers (bench/levers.py) only on request
TINY_ALL = SECTIONS[:-2]   # compiling takes minutes even at tiny size: `python -m bench compile --tiny`


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("section", nargs="+", choices=("all",) + SECTIONS,
                        help="one or more sections, run in the order given (all: every section but levers, "
                             "and but compile with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="demo-model configs on the CPU (harness check)")
    parser.add_argument("--device", default="cpu", help="device of a --tiny run")
    parser.add_argument("--json", type=Path, help="where the JSON report goes (default $OUT/bench.json)")
    parser.add_argument("--deadline", type=float, default=500.0,
                        help="seconds this run may take; steps that would not fit are skipped")
    parser.add_argument("--demo", type=Path, help="an existing demo models folder (else built in a temp dir)")
    parser.add_argument("--load-dir", type=Path, help="where the load section writes its safetensors")
    return parser.parse_args(argv)


def meta(args: argparse.Namespace, profile) -> dict:
    import diffusers
    import torch
    import transformers

    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(sys.argv[1:]), "profile": profile.name,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if profile.cuda else "cpu"}
    if profile.cuda:
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {type(exc).__name__}"
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fleet"]:  # its own flags and report
        from .fleet import main as fleet

        return fleet(argv[1:])
    args = parse(argv)
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from . import chat, fp8, levers, load, sdxl, wan
    from . import profile as profiles
    from .ceilings import run as ceilings
    from .context import Context
    from .measure import Deadline
    from .report import Report

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    demo = args.demo
    if demo is None:
        from local.demo_models import build

        demo = Path(tempfile.mkdtemp(prefix="bench-demo-"))
        atexit.register(shutil.rmtree, demo, True)
        build(demo, {"sdxl", "wan", "qwen"})
    profile = profiles.tiny(demo, args.device) if args.tiny else profiles.full(demo)
    path = args.json or (Path(os.environ["OUT"]) / "bench.json" if os.environ.get("OUT") else None)
    report = Report(meta(args, profile), path)
    deadline = Deadline(args.deadline - (time.monotonic() - started))
    ctx = Context(profile, report, deadline)
    runners = {"ceilings": ceilings, "sdxl": sdxl.run, "wan": wan.run, "chat": chat.run, "fp8": fp8.run,
               "load": lambda c: load.run(c, args.load_dir), "compile": sdxl.compiled,
               "levers": levers.run}
    print(f"[bench] {report.meta}", flush=True)
    every = TINY_ALL if args.tiny else FULL_ALL
    for name in (every if "all" in args.section else args.section):
        section_started = time.monotonic()
        try:
            runners[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
            report.error(name, exc)
        report.detail(name, "section_s", round(time.monotonic() - section_started, 1))
        report.save()
    report.meta["total_s"] = round(time.monotonic() - started, 1)
    report.save()
    print("\n" + report.table(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

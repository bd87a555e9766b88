"""``python -m bench fleet --tiny`` end to end: the two-GPU fleet run of issue 9 on the CPU (GPU_COUNT=2, the
memory manager's capacity probe, the demo models' configs), as the lead runs it on the two-GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_tiny_fleet_run_records_placement_ledgers_concurrency_and_room_for_wan(demo_models, tmp_path):
    """Runs the harness as a subprocess (its own redis-server, Supabase stand-in and orchestrator) and reads its
    JSON. Asserts: exit 0 and every recorded check passed; each worker process carries its GPU's
    CUDA_VISIBLE_DEVICES/FLEET_GPU_INDEX in both placements; the memory manager keeps one ledger entry per GPU
    (two) with the configured total; every job of the alone and joint bursts completed exactly once; in
    scenario B chat was unloaded on GPU 1 for WAN and nothing on GPU 0, SDXL stayed loaded, the WAN job
    completed; no process of the run is left behind."""
    out = tmp_path / "fleet.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    run = subprocess.run([sys.executable, "-m", "bench", "fleet", "--tiny", "--json", str(out),
                          "--demo", str(demo_models["sdxl"].parent), "--work-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["passed"]]
    assert run.returncode == 0 and not failed and not report["errors"], (
        failed, report["errors"], run.stdout[-3000:], run.stderr[-3000:])

    for tag in ("A", "B"):
        assert checks[f"{tag}: each worker process has FLEET_GPU_INDEX and CUDA_VISIBLE_DEVICES of its GPU"]["passed"]
        assert checks[f"{tag}: memory manager keeps one ledger entry per GPU"]["passed"]
        assert checks[f"{tag}: per-GPU totals match the device"]["passed"]
        assert checks[f"{tag}: the orchestrator stopped the fleet cleanly (exit 0, no process left to kill)"]["passed"]
    a, b = report["sections"]["scenario_a"], report["sections"]["scenario_b"]
    for section, expected in ((a, {"sdxl": "0", "chat": "0", "wan": "1"}), (b, {"sdxl": "0", "chat": "1", "wan": "1"})):
        processes = section["placement"]["processes"]
        for worker, gpu in expected.items():
            assert processes[worker], worker
            assert all(p["env"]["CUDA_VISIBLE_DEVICES"] == gpu and p["env"]["FLEET_GPU_INDEX"] == gpu
                       for p in processes[worker]), processes[worker]
        gpus = section["memory_manager"]["gpus"]
        assert [g["index"] for g in gpus] == [0, 1] and all(g["total_gb"] == 80.0 for g in gpus)

    for burst in ("alone_sdxl", "alone_wan", "alone_chat", "together"):
        families = a[burst]["families"]
        assert all(f["exactly_once"] and f["completed"] == f["jobs"] for f in families.values()), families
    assert set(a["together"]["families"]) == {"sdxl", "wan", "chat"}
    assert a["together"]["families"]["chat"]["tokens"] > 0

    unloads = [e for e in b["decisions"] if e["kind"] == "unload"]
    assert [(e["worker"], e["gpu"]) for e in unloads] == [("chat", 1)], unloads
    assert b["wan_job"]["status"] == "completed" and b["wan_job"]["callbacks"] == 1
    assert checks["B: SDXL on GPU 0 stayed loaded and reserved"]["passed"]
    ports = {str(port) for section in (a, b) for port in section["ports"].values()}
    assert not [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                if "--port" in (p.info["cmdline"] or []) and set(p.info["cmdline"]) & ports]

"""What the fleet looks like on the GPUs: which process is where, what NVML and the memory manager say.

- :func:`nvidia_smi`: per-GPU memory and per-process memory from ``nvidia-smi`` (None where it is absent).
- :func:`processes`: each program's process tree (from the orchestrator's status) with the placement variables
  of every process (``CUDA_VISIBLE_DEVICES``, ``FLEET_GPU_INDEX``, read from ``/proc/<pid>/environ``) and
  the NVIDIA device nodes it has open.
- :func:`placement_checks` / :func:`ledger_checks`: the verdicts, as ``(name, passed, detail)``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import psutil

MODEL_WORKERS = ("sdxl", "chat", "wan")
PLACEMENT_VARIABLES = ("CUDA_VISIBLE_DEVICES", "FLEET_GPU_INDEX", "FLEET_PROGRAM")
GIB_PER_MIB = 1 / 1024

Check = tuple[str, bool, str]


def _csv(args: list[str]) -> list[list[str]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def nvidia_smi() -> dict[str, Any] | None:
    """{"gpus": [{index, uuid, used_mib, total_mib}], "apps": [{pid, gpu_uuid, gpu, used_mib}]} or None."""
    gpus = _csv(["--query-gpu=index,uuid,memory.used,memory.total"])
    if gpus is None:
        return None
    apps = _csv(["--query-compute-apps=pid,gpu_uuid,used_memory"]) or []
    rows = [{"index": int(g[0]), "uuid": g[1], "used_mib": _number(g[2]), "total_mib": _number(g[3])}
            for g in gpus if len(g) == 4 and g[0].isdigit()]
    index_of = {g["uuid"]: g["index"] for g in rows}
    found = [{"pid": int(a[0]), "gpu_uuid": a[1], "gpu": index_of.get(a[1]), "used_mib": _number(a[2])}
             for a in apps if len(a) == 3 and a[0].isdigit()]
    return {"gpus": rows, "apps": found}


def gpu_names() -> list[str]:
    """``index, name, driver, total MiB`` of every GPU (for the report's header)."""
    return [", ".join(row) for row in _csv(["--query-gpu=index,name,driver_version,memory.total"]) or []]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        env = process.environ()
    except (psutil.Error, OSError):
        return {}
    return {k: env[k] for k in PLACEMENT_VARIABLES if k in env}


def _device_nodes(pid: int) -> list[str]:
    nodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if re.fullmatch(r"/dev/nvidia\d+", target):
                nodes.add(target)
    except OSError:
        pass
    return sorted(nodes)


def processes(programs: Mapping[str, dict]) -> dict[str, list[dict[str, Any]]]:
    """program → [{pid, name, env (placement variables), device_nodes}] for its leader and descendants."""
    found: dict[str, list[dict[str, Any]]] = {}
    for name, program in programs.items():
        pid = program.get("pid")
        if not pid:
            found[name] = []
            continue
        try:
            leader = psutil.Process(pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            found[name] = []
            continue
        found[name] = [{"pid": p.pid, "cmd": " ".join(_cmdline(p))[:160], "env": _environ(p),
                        "device_nodes": _device_nodes(p.pid)} for p in tree]
    return found


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def expected_visible(gpu_count: int, inherited: str | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES a worker placed on fleet GPU i should get (README: indices count the GPUs the
    orchestrator sees)."""
    listed = [d.strip() for d in (inherited or "").split(",") if d.strip()]
    return listed[:gpu_count] if len(listed) >= gpu_count else [str(i) for i in range(gpu_count)]


def physical_index(visible: list[str], index: int, smi: dict[str, Any] | None) -> int:
    """nvidia-smi's index of fleet GPU ``index`` (CUDA_VISIBLE_DEVICES entries are indices or UUIDs)."""
    entry = visible[index]
    if entry.isdigit():
        return int(entry)
    found = [g["index"] for g in (smi or {}).get("gpus", []) if g["uuid"] == entry]
    return found[0] if found else index


def placement_checks(tag: str, placement: Mapping[str, int], procs: Mapping[str, list[dict]],
                     visible: list[str], smi: dict[str, Any] | None) -> tuple[list[Check], dict[str, Any]]:
    """Env of every worker process, and (with nvidia-smi) which GPU each worker's CUDA process is on."""
    checks: list[Check] = []
    env_problems = []
    for worker, index in placement.items():
        tree = procs.get(worker, [])
        if not tree:
            env_problems.append(f"{worker}: no process")
        for p in tree:
            env = p["env"]
            if env.get("FLEET_GPU_INDEX") != str(index) or env.get("CUDA_VISIBLE_DEVICES") != visible[index]:
                env_problems.append(f"{worker} pid {p['pid']}: {env}")
    checks.append((f"{tag}: each worker process has FLEET_GPU_INDEX and CUDA_VISIBLE_DEVICES of its GPU",
                   not env_problems, "; ".join(env_problems) or
                   ", ".join(f"{w}→GPU {i} (CUDA_VISIBLE_DEVICES={visible[i]}, {len(procs.get(w, []))} processes)"
                             for w, i in placement.items())))
    owner = {p["pid"]: name for name, tree in procs.items() for p in tree}
    record: dict[str, Any] = {"nvidia_smi": smi if smi is not None else "not available"}
    if smi is None:
        return checks, record
    apps = [{**a, "program": owner.get(a["pid"], "other")} for a in smi["apps"]]
    record["apps"] = apps
    per_worker: dict[str, set] = {w: {a["gpu"] for a in apps if a["program"] == w} for w in placement}
    physical = {w: physical_index(visible, i, smi) for w, i in placement.items()}
    if any(a["program"] != "other" for a in apps):
        wrong = {w: sorted(g) for w, g in per_worker.items() if g != {physical[w]}}
        checks.append((f"{tag}: nvidia-smi shows each worker's CUDA process on its GPU only", not wrong,
                       f"expected {physical}, wrong or missing: {wrong}" if wrong else
                       ", ".join(f"{w} on nvidia-smi GPU {physical[w]}" for w in placement)))
    else:
        # pids from another PID namespace: judge by memory instead (each GPU with a worker holds its models)
        used = {g["index"]: (g["used_mib"] or 0) * GIB_PER_MIB for g in smi["gpus"]}
        busy = set(physical.values())
        ok = all(used.get(i, 0) > 2.0 for i in busy)
        checks.append((f"{tag}: every GPU with a worker holds memory (nvidia-smi pids not ours)", ok,
                       ", ".join(f"GPU {i} {u:.1f} GiB used" for i, u in sorted(used.items()))))
    return checks, record


def ledger_checks(tag: str, status: dict[str, Any], gpu_count: int, totals_gib: list[float], tolerance: float,
                  placement: Mapping[str, int]) -> list[Check]:
    """One ledger entry per GPU with the expected total; each worker's reservation on its own GPU."""
    gpus = sorted(status.get("gpus", []), key=lambda g: g["index"])
    indices = [g["index"] for g in gpus]
    totals = [g["total_gb"] for g in gpus]
    ok_totals = len(totals) == len(totals_gib) and all(abs(a - b) <= tolerance for a, b in zip(totals, totals_gib))
    checks: list[Check] = [
        (f"{tag}: memory manager keeps one ledger entry per GPU", indices == list(range(gpu_count)),
         f"GPUs {indices} (probe {status.get('probe')}), expected {list(range(gpu_count))}"),
        (f"{tag}: per-GPU totals match the device", ok_totals,
         f"ledger {totals} GiB, expected {[round(t, 2) for t in totals_gib]} (±{tolerance})"),
    ]
    held = {}
    for r in status.get("reservations", []):
        held.setdefault(r["worker"], set()).add(r["gpu"])
    wrong = {w: sorted(held.get(w, set())) for w, i in placement.items() if held.get(w) != {i}}
    checks.append((f"{tag}: each worker's reservation is on its GPU", not wrong,
                   f"expected {dict(placement)}, reservations {({w: sorted(g) for w, g in held.items()})}"))
    return checks


def gpu_table(status: dict[str, Any], smi: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per GPU: the memory manager's total/free/reserved/available and the workers it counts there, next to
    nvidia-smi's used/total (GiB)."""
    rows = []
    by_index = {g["index"]: g for g in (smi or {}).get("gpus", [])}
    for g in sorted(status.get("gpus", []), key=lambda g: g["index"]):
        row = {k: g.get(k) for k in ("index", "total_gb", "free_gb", "reserved_gb", "available_gb", "pressure",
                                     "workers")}
        nv = by_index.get(g["index"])
        if nv is not None:
            row["nvml_used_gib"] = round((nv["used_mib"] or 0) * GIB_PER_MIB, 2)
            row["nvml_total_gib"] = round((nv["total_mib"] or 0) * GIB_PER_MIB, 2)
        rows.append(row)
    return rows


def worker_memory(procs: Mapping[str, list[dict]], smi: dict[str, Any] | None) -> dict[str, float]:
    """GiB each program's processes hold on the GPUs (nvidia-smi per-process numbers)."""
    if smi is None:
        return {}
    owner = {p["pid"]: name for name, tree in procs.items() for p in tree}
    held: dict[str, float] = {}
    for a in smi["apps"]:
        name = owner.get(a["pid"])
        if name is not None:
            held[name] = round(held.get(name, 0.0) + (a["used_mib"] or 0) * GIB_PER_MIB, 2)
    return held

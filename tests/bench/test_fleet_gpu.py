"""bench/fleet_gpu.py on a stand-in ``nvidia-smi`` (a script on PATH printing what the real one prints for the
two queries): per-GPU and per-process memory, which worker is on which GPU, and the ledger verdicts."""
from __future__ import annotations

import os
import stat

import pytest

from bench import fleet_gpu

GPUS = "0, GPU-aaaa, 40000, 143771\n1, GPU-bbbb, 20000, 143771\n"


@pytest.fixture
def smi(tmp_path, monkeypatch):
    def install(apps: str) -> None:
        script = tmp_path / "nvidia-smi"
        script.write_text("#!/bin/sh\ncase \"$1\" in\n"
                          f"  --query-gpu=*) printf '{GPUS}' ;;\n"
                          f"  --query-compute-apps=*) printf '{apps}' ;;\n"
                          "  *) exit 2 ;;\nesac\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return install


def procs(env_gpu: dict[str, str]) -> dict[str, list[dict]]:
    pids = {"sdxl": 101, "chat": 102, "wan": 103}
    return {w: [{"pid": pids[w], "cmd": "", "env": {"CUDA_VISIBLE_DEVICES": g, "FLEET_GPU_INDEX": g},
                 "device_nodes": []}] for w, g in env_gpu.items()}


def test_nvidia_smi_rows_and_pids_mapped_to_workers_and_gpus(smi):
    smi("101, GPU-aaaa, 12000\n102, GPU-aaaa, 25000\n103, GPU-bbbb, 18000\n999, GPU-bbbb, 500\n")
    found = fleet_gpu.nvidia_smi()
    assert found["gpus"][1] == {"index": 1, "uuid": "GPU-bbbb", "used_mib": 20000.0, "total_mib": 143771.0}
    assert [a["gpu"] for a in found["apps"]] == [0, 0, 1, 1]
    placement = {"sdxl": 0, "chat": 0, "wan": 1}
    checks, record = fleet_gpu.placement_checks("A", placement, procs({"sdxl": "0", "chat": "0", "wan": "1"}),
                                                ["0", "1"], found)
    assert [ok for _, ok, _ in checks] == [True, True], checks
    assert {a["pid"]: a["program"] for a in record["apps"]}[999] == "other"
    assert fleet_gpu.worker_memory(procs(dict.fromkeys(placement, "0")), found) == {
        "sdxl": 11.72, "chat": 24.41, "wan": 17.58}


def test_a_worker_on_the_wrong_gpu_fails_both_checks(smi):
    smi("101, GPU-aaaa, 12000\n102, GPU-bbbb, 25000\n103, GPU-bbbb, 18000\n")
    checks, _ = fleet_gpu.placement_checks("A", {"sdxl": 0, "chat": 0, "wan": 1},
                                           procs({"sdxl": "0", "chat": "1", "wan": "1"}), ["0", "1"],
                                           fleet_gpu.nvidia_smi())
    assert [ok for _, ok, _ in checks] == [False, False]
    assert "chat pid 102" in checks[0][2] and "'chat': [1]" in checks[1][2]


def test_foreign_pids_fall_back_to_memory_per_gpu(smi):
    smi("7, GPU-aaaa, 12000\n8, GPU-bbbb, 18000\n")
    checks, _ = fleet_gpu.placement_checks("A", {"sdxl": 0, "wan": 1}, procs({"sdxl": "0", "wan": "1"}),
                                           ["0", "1"], fleet_gpu.nvidia_smi())
    assert checks[1][1] and "pids not ours" in checks[1][0]


def test_ledger_checks_and_gpu_table():
    status = {"probe": "nvml", "gpus": [
        {"index": 0, "total_gb": 140.4, "free_gb": 100.0, "reserved_gb": 25.0, "available_gb": 99.0,
         "pressure": "low", "workers": ["chat", "sdxl"]},
        {"index": 1, "total_gb": 140.4, "free_gb": 120.0, "reserved_gb": 30.0, "available_gb": 110.0,
         "pressure": "low", "workers": ["wan"]}],
        "reservations": [{"worker": "sdxl", "gpu": 0}, {"worker": "chat", "gpu": 0}, {"worker": "wan", "gpu": 1}]}
    placement = {"sdxl": 0, "chat": 0, "wan": 1}
    assert all(ok for _, ok, _ in fleet_gpu.ledger_checks("A", status, 2, [140.4, 140.4], 1.0, placement))
    wrong = fleet_gpu.ledger_checks("A", status, 2, [80.0, 80.0], 1.0, {**placement, "wan": 0})
    assert [ok for _, ok, _ in wrong] == [True, False, False]
    table = fleet_gpu.gpu_table(status, {"gpus": [{"index": 0, "uuid": "u", "used_mib": 40960.0,
                                                    "total_mib": 143771.0}], "apps": []})
    assert table[0]["nvml_used_gib"] == 40.0 and "nvml_used_gib" not in table[1]


def test_physical_index_of_uuid_and_reordered_visible_devices():
    found = {"gpus": [{"index": 0, "uuid": "GPU-aaaa"}, {"index": 1, "uuid": "GPU-bbbb"}]}
    assert fleet_gpu.physical_index(["GPU-bbbb", "GPU-aaaa"], 0, found) == 1
    assert fleet_gpu.physical_index(["1", "0"], 1, found) == 0
    assert fleet_gpu.expected_visible(2, "3,5,7") == ["3", "5"]
    assert fleet_gpu.expected_visible(2, None) == ["0", "1"]

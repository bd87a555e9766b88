"""The memory manager's ``/metrics`` over real HTTP: the default process collectors, the pod's CPU, memory
and disk (psutil; memory from the cgroup when it has a limit), the ledger per GPU, and the GPU gauges from NVML,
present with a (fake) NVML and absent without one."""
from __future__ import annotations

import psutil
import pytest
import requests

from common.settings import Secret
from local.net import BackgroundServer
from memory_manager.app import MemoryDeps, create_app
from memory_manager.metrics import GIB, MemoryMetrics
from memory_manager.policy import MemoryPolicy
from memory_manager.probe import physical_devices

from .exposition import families, value
from .fake_nvml import Device, FakeNvml
from .manager import ADMIN, policy_of

GPU_GAUGES = ("pod_gpu_memory_used_bytes", "pod_gpu_memory_total_bytes", "pod_gpu_utilization_ratio",
              "pod_gpu_temperature_celsius", "pod_gpu_power_watts")


@pytest.fixture
def serve():
    servers = []

    def start(policy: MemoryPolicy, metrics: MemoryMetrics) -> str:
        server = BackgroundServer(create_app(MemoryDeps(policy, Secret(ADMIN), metrics)))
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


def scrape(url: str) -> str:
    answer = requests.get(url + "/metrics", timeout=5)
    assert answer.status_code == 200
    return answer.text


def test_gpu_gauges_from_nvml_per_fleet_gpu(serve, tmp_path):
    """``CUDA_VISIBLE_DEVICES=2,3``: NVML devices 2 and 3 are fleet GPUs 0 and 1; device 3 reports no power."""
    nvml = FakeNvml([Device(80 * GIB, 0), Device(80 * GIB, 0),
                     Device(80 * GIB, 30 * GIB, utilization=97, temperature=71, power_mw=612_500),
                     Device(40 * GIB, 1 * GIB, utilization=0, temperature=35, power_mw=None)])
    policy = policy_of(2)
    text = scrape(serve(policy, MemoryMetrics(policy, nvml=nvml, physical=physical_devices("2,3"),
                                              cgroup=tmp_path)))
    assert value(text, "pod_gpu_memory_used_bytes", gpu="0") == 30 * GIB
    assert value(text, "pod_gpu_memory_total_bytes", gpu="1") == 40 * GIB
    assert value(text, "pod_gpu_utilization_ratio", gpu="0") == pytest.approx(0.97)
    assert value(text, "pod_gpu_temperature_celsius", gpu="1") == 35
    assert value(text, "pod_gpu_power_watts", gpu="0") == pytest.approx(612.5)
    assert value(text, "pod_gpu_power_watts", gpu="1") is None       # not supported there: absent
    assert value(text, "pod_gpu_memory_used_bytes", gpu="2") is None  # only the fleet's GPUs


def test_without_nvml_the_gpu_gauges_are_absent(serve, tmp_path):
    policy = policy_of(1)
    text = scrape(serve(policy, MemoryMetrics(policy, nvml=None, cgroup=tmp_path)))
    found = families(text)
    assert not [name for name in GPU_GAUGES if name in found]
    assert "pod_cpu_percent" in found and "process_cpu_seconds" in found and "python_info" in found


def test_pod_cpu_memory_and_disk(serve, tmp_path):
    policy = policy_of(1)
    text = scrape(serve(policy, MemoryMetrics(policy, nvml=None, cgroup=tmp_path, disk_paths=["/", str(tmp_path)])))
    assert 0 <= value(text, "pod_cpu_percent") <= 100
    machine = psutil.virtual_memory()
    assert value(text, "pod_memory_total_bytes") == machine.total   # no cgroup files here: the machine's
    assert 0 < value(text, "pod_memory_used_bytes") <= machine.total
    disk = psutil.disk_usage("/")
    assert value(text, "pod_disk_total_bytes", path="/") == disk.total
    assert value(text, "pod_disk_used_bytes", path=str(tmp_path)) > 0


def test_pod_memory_comes_from_the_cgroup_when_it_has_a_limit(serve, tmp_path):
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    policy = policy_of(1)
    url = serve(policy, MemoryMetrics(policy, nvml=None, cgroup=tmp_path, disk_paths=["/"]))
    text = scrape(url)
    assert (value(text, "pod_memory_used_bytes"), value(text, "pod_memory_total_bytes")) == (1 << 30, 8 << 30)
    (tmp_path / "memory.max").write_text("max\n")   # no limit: the machine's memory
    assert value(scrape(url), "pod_memory_total_bytes") == psutil.virtual_memory().total


def test_the_ledger_per_gpu_and_worker_and_the_request_counter(serve, tmp_path):
    policy = policy_of(2)
    url = serve(policy, MemoryMetrics(policy, nvml=None, cgroup=tmp_path, disk_paths=["/"]))
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for body in ({"worker": "sdxl", "gpu": 0, "gb": 10}, {"worker": "chat", "gpu": 1, "gb": 25}):
        assert requests.post(url + "/reservations", json=body, headers=headers, timeout=5).status_code == 200
    text = scrape(url)
    assert value(text, "fleet_gpu_memory_reserved_bytes", gpu="0", worker="sdxl") == 10 * GIB
    assert value(text, "fleet_gpu_memory_reserved_bytes", gpu="1", worker="chat") == 25 * GIB
    assert value(text, "fleet_gpu_memory_available_bytes", gpu="1") == pytest.approx((80 - 25 - 1) * GIB)
    assert value(text, "fleet_gpu_pressure_level", gpu="0") == 0
    assert value(text, "memory_manager_http_requests_total", endpoint="/reservations", status="200") == 2
    assert requests.get(url + "/live", timeout=5).json()["status"] == "alive"

"""The names every process's ``/metrics`` shows, read from the real apps (a chat worker's, whose registry also
holds its engine's metrics, and the memory manager's with a fake NVML): Prometheus' conventions hold, and the
Grafana dashboard (docs/grafana-dashboard.json) asks only for names that exist."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.settings import Secret
from memory_manager.app import MemoryDeps, create_app
from memory_manager.metrics import GIB, MemoryMetrics
from workers.chat import create_handler
from workers.chat.settings import ChatSettings
from workers.core.service import Service

from .exposition import families, sample_names
from .fake_nvml import Device, FakeNvml
from .manager import ADMIN, policy_of

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
PREFIXES = ("worker_", "fleet_", "pod_", "memory_manager_", "process_", "python_")
NOT_BASE_UNITS = re.compile(r"_(ms|milliseconds|microseconds|minutes|hours|kb|mb|gb|kib|mib|gib|percentage)(_|$)")
#: PromQL words that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by",
                "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
                "topk", "bottomk", "delta", "deriv", "abs", "clamp_min", "clamp_max", "time", "vector", "scalar"}


def _never_exits(code):
    raise AssertionError(f"the app tried to exit with {code}")


@pytest.fixture(scope="module")
def expositions(tmp_path_factory) -> dict[str, str]:
    settings = ChatSettings(device="cpu")
    worker = Service(settings, create_handler(settings), "names-chat-0", exit_process=_never_exits).create_app()
    policy = policy_of(1)
    nvml = FakeNvml([Device(80 * GIB, 10 * GIB)])
    metrics = MemoryMetrics(policy, nvml=nvml, cgroup=tmp_path_factory.mktemp("cgroup"), disk_paths=["/"])
    manager = create_app(MemoryDeps(policy, Secret(ADMIN), metrics))
    texts = {}
    for name, app in (("worker", worker), ("memory_manager", manager)):
        answer = app.test_client().get("/metrics")
        assert answer.status_code == 200
        texts[name] = answer.get_data(as_text=True)
    return texts


def test_names_follow_the_prometheus_conventions(expositions):
    for process, text in expositions.items():
        for name, family in families(text).items():
            assert name.startswith(PREFIXES), (process, name)
            assert not NOT_BASE_UNITS.search(name), (process, name)
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples), (process, name)
            if family.type == "histogram" and name.startswith(("worker_", "fleet_")):
                assert name.endswith("_seconds"), (process, name)   # the fleet's histograms time things
            if name.endswith("_percent"):
                assert name == "pod_cpu_percent", name   # the one percent, named for the ops page


def test_the_documented_names_are_served(expositions):
    served = set().union(*map(sample_names, expositions.values()))
    for name in ("worker_jobs_total", "worker_job_duration_seconds_bucket", "fleet_queue_jobs",
                 "worker_callback_retries_total", "worker_storage_retries_total", "fleet_callback_outbox_entries",
                 "worker_chat_tokens_generated_total", "worker_chat_time_to_first_token_seconds_bucket",
                 "worker_chat_active_sequences", "pod_gpu_memory_used_bytes", "pod_gpu_utilization_ratio",
                 "pod_gpu_temperature_celsius", "pod_gpu_power_watts", "pod_cpu_percent", "pod_memory_used_bytes",
                 "pod_memory_total_bytes", "pod_disk_used_bytes", "pod_disk_total_bytes",
                 "process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert name in served, name


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: label matchers, ranges, strings, grouping clauses and
    function names taken out of it first."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
    return {w for w in words if w not in PROMQL_WORDS}


def test_every_dashboard_expression_uses_served_names(expositions):
    dashboard = json.loads(DASHBOARD.read_text())
    served = set().union(*map(sample_names, expositions.values()))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= served, (expr, names - served)
        used |= names
    assert {"worker_jobs_total", "fleet_queue_jobs", "worker_chat_time_to_first_token_seconds_bucket",
            "pod_gpu_memory_used_bytes", "pod_cpu_percent"} <= used


def test_the_dashboard_is_importable_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["refId"]

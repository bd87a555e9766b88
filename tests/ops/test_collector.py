"""The ops page's collector (router/collector.py) against real sources on loopback: the memory manager's app
with a capacity probe, the orchestrator's status server, a chat worker's ``/status``, and real Redis over
both transports; its document matches the OpenAPI schema and holds no user text and no secret."""
from __future__ import annotations

import json
import time

import jsonschema_rs
import pytest
import requests
from flask import Flask, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from common import keys, openapi
from common.background import BackgroundServer
from common.settings import Secret
from common.topology import DEFAULT_PORTS
from router.config import RouterSettings
from router.ops import _utilization_source, collector_from
from tests.conftest import UPSTASH_TEST_TOKEN
from tests.memory_manager.conftest import ADMIN, start_manager, stop_manager
from workers.core.journal import Journal
from workers.core.transport import RedisProtocolTransport

from .conftest import PROMPT


class Clock:
    """Wall time that moves only when told (journal records are stamped with the real one)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def validate(document: dict) -> None:
    schemas = openapi.router_document()["components"]["schemas"]
    validator = jsonschema_rs.validator_for({**schemas["OpsData"], "components": {"schemas": schemas}})
    errors = [e.message for e in validator.iter_errors(document)]
    assert errors == []


@pytest.fixture
def manager():
    m = start_manager(capacity=80.0, gpus=2)
    yield m
    stop_manager(m)


def reserve(manager, worker: str, gpu: int, gb: float, label: str) -> None:
    answer = requests.post(manager.url + "/reservations", json={"worker": worker, "gpu": gpu, "gb": gb, "label": label},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert answer.status_code == 200, answer.text


def fill_redis(redis_server, client) -> None:
    element = json.dumps([json.dumps({"id": "job-waiting-1", "type": "sdxl_image_fast", "prompt": PROMPT})])
    client.rpush("sdxl_queue", element, element)
    client.rpush("wan_queue", element)
    client.rpush(keys.processing("sdxl_queue", "pod-sdxl-0-aaaaaa"), element)
    client.sadd(keys.ACTIVE_WORKERS, keys.active_member("sdxl_queue", "pod-sdxl-0-aaaaaa"),
                keys.active_member("chat_queue", "pod-chat-0-bbbbbb"))
    client.rpush(keys.dead("chat_queue"), element)
    client.hset(keys.OUTBOX, "job-owed-1", json.dumps({"job_id": "job-owed-1", "prompt": PROMPT}))
    journal = Journal(RedisProtocolTransport(redis_server.url, timeout=5), "pod-sdxl-0-aaaaaa")
    journal.write("job-done-0123456", "sdxl_image_fast", "completed", 2.5, 1, b"{}")
    journal.write("job-failed-98765", "sdxl_image_fast", "failed", 0.4, 2,
                  json.dumps({"error_message": PROMPT, "metadata": {"error_type": "INVALID_PROMPT"}}).encode())
    client.lpush(keys.JOURNAL, "not json", json.dumps({"id": "x", "t": "soon", "outcome": "completed"}))


@pytest.mark.parametrize("transport", ["redis", "upstash"])
def test_a_round_gathers_every_source_into_the_document(transport, manager, orchestrator_status, chat_worker,
                                                        redis_server, redis_client, upstash_front):
    reserve(manager, "sdxl", 0, 10.0, "sdxl_base")
    reserve(manager, "chat", 1, 16.5, "qwen_instruct")
    fill_redis(redis_server, redis_client)
    queue = ({"redis_url": Secret(redis_server.url)} if transport == "redis"
             else {"upstash_url": upstash_front.url, "upstash_token": Secret(UPSTASH_TEST_TOKEN)})
    ports = {**DEFAULT_PORTS, "memory_manager": manager.server.port, "chat": chat_worker.server.port}
    collector = collector_from(RouterSettings(ports=ports, status_port=orchestrator_status.port,
                                              ops_collect_seconds=5.0, **queue))
    collector.wall = clock = Clock()
    collector.collect()
    clock.now += 5
    chat_worker.advance(tokens=250, first_tokens=5, ttft_seconds_total=1.0, active=3)
    collector.collect()
    doc = collector.snapshot()
    validate(doc)

    assert {name: s["state"] for name, s in doc["sources"].items()} == dict.fromkeys(
        ("memory_manager", "gpu_utilization", "orchestrator", "redis", "chat", "pod"), "ok")
    gpu0, gpu1 = doc["gpus"]
    assert (gpu0["total_gb"], gpu0["reserved_gb"], gpu0["pressure"]) == (80.0, 10.0, "low")
    assert gpu0["models"] == [{"worker": "sdxl", "label": "sdxl_base", "gb": 10.0}]
    assert gpu1["history"]["reserved_gb"] == {"chat": [16.5, 16.5]} and len(gpu1["history"]["t"]) == 2
    assert [p["name"] for p in doc["programs"]] == ["router", "chat", "wan"]
    assert {p["state"] for p in doc["programs"]} == {"EXITED"}
    assert {q["name"]: (q["waiting"], q["processing"], q["dead"]) for q in doc["queues"]} == {
        "sdxl_queue": (2, 1, 0), "wan_queue": (1, 0, 0), "chat_queue": (0, 0, 1)}
    assert (doc["outbox"], doc["rejected"]) == (1, 0)
    assert doc["queue_history"]["waiting"]["sdxl_queue"] == [2, 2]
    recent = doc["jobs"]["recent"]
    assert [(j["id"], j["outcome"], j["error_type"]) for j in recent] == [
        ("job-fail", "failed", "INVALID_PROMPT"), ("job-done", "completed", None)]
    (sdxl,) = doc["jobs"]["types"]
    assert (sdxl["type"], sdxl["count"], sdxl["failed"], sdxl["p50_seconds"]) == ("sdxl_image_fast", 2, 1, 2.5)
    chat = doc["chat"]
    assert (chat["active"], chat["tokens_per_second"], chat["ttft_seconds"]) == (3, 50.0, 0.2)
    assert chat["loaded_models"] == ["qwen_instruct"] and chat["engine"] is True
    text = json.dumps(doc)
    assert PROMPT not in text and "SECRET" not in text and "job-done-0123456" not in text


def test_a_source_that_stops_answering_is_shown_unreachable_with_the_age_of_its_last_reading(
        manager, orchestrator_status, chat_worker):
    ports = {**DEFAULT_PORTS, "memory_manager": manager.server.port, "chat": chat_worker.server.port}
    collector = collector_from(RouterSettings(ports=ports, status_port=orchestrator_status.port))
    collector.wall = clock = Clock()
    collector.collect()
    chat_worker.server.stop()
    clock.now += 7
    collector.collect()
    doc = collector.snapshot()
    validate(doc)
    assert doc["sources"]["chat"] == {"state": "unreachable", "age_seconds": 7.0}
    assert doc["sources"]["redis"] == {"state": "off", "age_seconds": None}   # no REDIS_URL: not asked
    assert doc["sources"]["memory_manager"]["state"] == "ok" and doc["queues"] == []


def test_the_journal_is_read_whole_once_then_only_its_newest_records(redis_server, redis_client):
    writer = Journal(RedisProtocolTransport(redis_server.url, timeout=5), "w1")
    asked: list[int] = []
    collector = collector_from(RouterSettings(redis_url=Secret(redis_server.url), status_port=0))
    read = collector.sources.redis
    collector.sources.redis = lambda count: asked.append(count) or read(count)
    collector.sources.memory = collector.sources.chat = None
    for n in range(3):
        writer.write(f"job-{n}", "video_fast", "completed", 1.0, 1, b"{}")
        collector.collect()
    assert asked == [keys.JOURNAL_MAX, keys.JOURNAL_MAX, 200]
    assert [j["id"] for j in collector.snapshot()["jobs"]["recent"]] == ["job-2", "job-1", "job-0"]


def test_gpu_utilisation_comes_from_the_memory_managers_prometheus_gauge():
    registry = CollectorRegistry()
    gauge = Gauge("pod_gpu_utilization_ratio", "GPU utilisation", ["gpu"], registry=registry)
    gauge.labels("0").set(0.375)
    gauge.labels("1").set(1.0)
    app = Flask("metrics-standin")
    app.get("/metrics")(lambda: Response(generate_latest(registry), mimetype="text/plain"))
    server = BackgroundServer(app)
    session = requests.Session()
    try:
        assert _utilization_source(session, server.url + "/metrics")() == {0: 37.5, 1: 100.0}
        assert _utilization_source(session, server.url + "/no-metrics-here")() == {}   # 404: none to show
    finally:
        server.stop()

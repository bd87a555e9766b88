"""Hostile queue elements through the real worker processes of a fleet (CONTRACT §7, §3).

- Storage path traversal: a hostile ``user_id`` gets a ``failed`` callback (``INVALID_JOB``); a hostile ``id``
  (no usable id for a callback) goes to ``<queue>:dead`` with the reason in the dead log; and no file is
  written outside ``<bucket>/<user_id>/<job_id>/<name>`` — the storage folder, the fleet's TMPDIR and /tmp
  are scanned for the marker the hostile values carry.
- A wrong type in every job field of every queue: ``failed`` with ``INVALID_JOB`` / ``INVALID_PROMPT``,
  never ``INTERNAL_ERROR``; elements that cannot be decoded at all go to the dead list; the workers keep
  serving and a good job after the abuse completes.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from .fleet import wait_all

MARK = f"pwned{uuid.uuid4().hex[:8]}"  # only in hostile values: must never appear in a file name
RUN = uuid.uuid4().hex[:8]  # in the ids of jobs that may legitimately write
SMALL = {"sdxl_queue": {"resolution": "64x64", "num_inference_steps": 2},
         "wan_queue": {"size": "64*64", "num_inference_steps": 2, "frame_num": 5},
         "chat_queue": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
TYPES = {"sdxl_queue": "sdxl_image_fast", "wan_queue": "image_fast", "chat_queue": "chat_conversation"}
HOSTILE_USER_IDS = [f"../{MARK}", f"../../{MARK}", f"../../../../../../tmp/{MARK}", f"/tmp/{MARK}", "a/b",
                    f"{MARK}/..", "..", ".", "", "x" * 300, f"a\\..\\{MARK}", f"%2e%2e%2f{MARK}", f"{MARK}\x00.png",
                    f"{MARK}\n", f"-{MARK}", f"ü{MARK}", f"{MARK} x", f"C:\\{MARK}", 5, [], {"a": MARK}]
HOSTILE_IDS = [f"../{MARK}", f"/tmp/{MARK}", "a/b", "", "x" * 300, "..", f"{MARK}\n", f".{MARK}", 5, [MARK],
               {"id": MARK}, None, True]
LAYOUT = re.compile(r"^workspace-temp/[A-Za-z0-9][A-Za-z0-9_-]{0,127}/[A-Za-z0-9][A-Za-z0-9_-]{0,127}/"
                    r"[A-Za-z0-9][A-Za-z0-9_.-]*$")


def job(queue: str, job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "type": TYPES[queue], "user_id": "user-1", "prompt": "a small test",
            "config": dict(SMALL[queue]), **fields}


def assert_invalid(body: dict, *codes: str) -> None:
    assert body["status"] == "failed", body
    assert body["metadata"]["error_type"] in (codes or ("INVALID_JOB",)), body
    assert body["metadata"]["retryable"] is False and body["assets"] == []
    message = body["error_message"]
    assert message and "Traceback" not in message and "/work/" not in message and "SEKRET" not in message


def test_hostile_user_ids_fail_and_hostile_ids_go_dead_with_nothing_written_outside_the_layout(fleet_a, standin):
    client = fleet_a.queue.redis()
    good = {queue: f"good-{queue[:4]}-{RUN}" for queue in ("sdxl_queue", "wan_queue")}
    bad_user: dict[str, str] = {}
    for queue in ("sdxl_queue", "wan_queue"):
        for i, user_id in enumerate(HOSTILE_USER_IDS):
            job_id = f"user-{queue[:4]}-{i}-{RUN}"
            bad_user[job_id] = user_id
            fleet_a.queue.push(queue, job(queue, job_id, user_id=user_id))
    dead_raw = []
    for queue in ("sdxl_queue", "wan_queue"):
        for job_id in HOSTILE_IDS:
            element = json.dumps([json.dumps(job(queue, "unused", id=job_id))])
            dead_raw.append((queue, element))
            fleet_a.queue.push(queue, element)
        alias = json.dumps({"job_id": f"../{MARK}", "type": TYPES[queue], "user_id": "user-1"})
        dead_raw.append((queue, alias))
        fleet_a.queue.push(queue, alias)
        fleet_a.queue.push(queue, job(queue, good[queue]))  # a good job after them all
    bodies = wait_all(standin, list(bad_user) + list(good.values()), timeout=120)
    for job_id in bad_user:
        assert_invalid(bodies[job_id])
        assert "user_id" in bodies[job_id]["error_message"]
    for queue, job_id in good.items():
        assert bodies[job_id]["status"] == "completed", bodies[job_id]
        assert all(a["url"].startswith(f"user-1/{job_id}/") for a in bodies[job_id]["assets"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(client.llen(f"{q}:dead") for q in ("sdxl_queue", "wan_queue")) < len(
            dead_raw):
        time.sleep(0.1)
    for queue in ("sdxl_queue", "wan_queue"):
        dead = [raw.decode() for raw in client.lrange(f"{queue}:dead", 0, -1)]
        for element in (e for q, e in dead_raw if q == queue):
            assert element in dead
        reasons = [json.loads(entry)["reason"] for entry in client.lrange(f"{queue}:dead:log", 0, -1)]
        assert sum(r.startswith("undecodable:") for r in reasons) >= len(HOSTILE_IDS) + 1
    hostile_ids = {str(i) for i in HOSTILE_IDS} | {f"../{MARK}"}
    assert not [c for c in standin.callbacks() if str(c.job_id) in hostile_ids]
    _assert_layout_only(fleet_a.storage)
    _assert_marker_nowhere([fleet_a.workdir, Path("/tmp"), Path(os.environ.get("TMPDIR", "/tmp"))])


def _assert_layout_only(storage: Path) -> None:
    stray = [str(p.relative_to(storage)) for p in storage.rglob("*")
             if p.is_file() and not LAYOUT.match(str(p.relative_to(storage)))]
    assert stray == []
    assert [p for p in storage.iterdir()] == [storage / "workspace-temp"]


def _assert_marker_nowhere(roots: list[Path]) -> None:
    found = []
    for root in {r.resolve() for r in roots}:
        for directory, dirs, files in os.walk(root):
            found += [os.path.join(directory, n) for n in dirs + files if MARK in n]
    assert found == []


# ------------------------------------------------------------------------------------- wrong types, per field
INT = ["abc", [], {}, True, -5, 10 ** 30, 1.5]
REAL = ["abc", [], {}, True, -1, 1e9]
TEXT = [5, [], {"a": 1}, True]
FLAG = ["abc", 5, [], {}]
PENALTY = ["abc", [], {}, True, -3, 9]
SIZE = ["abc", [], 5, "0x0", "64x", "x64", "-64x64"]
#: queue -> [(dotted path, values, paths to drop so this one is the first present)]
FIELDS: dict[str, list[tuple[str, list, tuple[str, ...]]]] = {
    "sdxl_queue": [
        ("config.num_inference_steps", INT, ()), ("config.steps", INT, ("config.num_inference_steps",)),
        ("metadata.steps", INT, ("config.num_inference_steps",)), ("config.guidance_scale", REAL, ()),
        ("metadata.guidance_scale", REAL, ()), ("config.resolution", SIZE, ()),
        ("config.width", INT, ("config.resolution",)), ("config.height", INT, ("config.resolution",)),
        ("config.num_images", ["six", [], {}, True, "NaN"], ()), ("config.seed", INT[:5] + [10 ** 30], ()),
        ("config.denoise_strength", REAL, ()), ("metadata.denoise_strength", REAL, ()),
        ("metadata.reference_strength", REAL, ()), ("config.negative_prompt", TEXT, ()),
        ("metadata.reference_image_url", TEXT, ()), ("reference_image_url", TEXT, ()),
        ("metadata.exact_copy_mode", FLAG, ()),
    ],
    "wan_queue": [
        ("config.num_inference_steps", INT, ()), ("config.sample_steps", INT, ("config.num_inference_steps",)),
        ("config.guidance_scale", REAL, ()), ("config.sample_guide_scale", REAL, ()),
        ("config.resolution", SIZE, ()), ("config.size", SIZE + ["65*64", "99999*64"], ()),
        ("config.seed", ["abc", [], {}, True, -5, 10 ** 30], ()), ("config.sample_shift", REAL + [0], ()),
        ("config.enhance_prompt", FLAG, ()), ("metadata.enhance_instruction", TEXT, ()),
        ("config.image", TEXT, ()), ("metadata.reference_image_url", TEXT, ()), ("config.first_frame", TEXT, ()),
        ("metadata.start_reference_url", TEXT, ()), ("config.last_frame", TEXT, ()),
        ("metadata.end_reference_url", TEXT, ()), ("config.negative_prompt", TEXT, ()),
    ],
    "chat_queue": [
        ("config.messages", ["hi", 5, {}, [5], [{"role": "root", "content": "x"}], [{"role": "user"}],
                             [{"role": "user", "content": 5}], [{"role": "user", "content": "x"}] * 300], ()),
        ("config.max_tokens", INT, ()), ("config.temperature", REAL, ()), ("config.top_p", REAL, ()),
        ("config.presence_penalty", PENALTY, ()), ("config.frequency_penalty", PENALTY, ()),
        ("config.model", [5, "gpt-4", [], {}], ()), ("config.sfw_mode", FLAG, ()), ("config.seed", ["abc", 1.5], ()),
    ],
}
TOP = [("prompt", [5, [], {}]), ("negative_prompt", [5, []]), ("compel_enabled", ["abc", 5]),
       ("compel_weights", [5, {}]), ("config", ["str", 5, [1]]), ("metadata", ["str", 5, [1]]),
       ("type", [5, [], "nope", "chat_conversation_x"]), ("user_id", [5, None])]


def _with(base: dict[str, Any], path: str, value: Any, drop: tuple[str, ...]) -> dict[str, Any]:
    body = json.loads(json.dumps(base))
    for dropped in drop:
        scope, _, key = dropped.partition(".")
        body.get(scope, {}).pop(key, None)
    scope, _, key = path.partition(".")
    if key:
        body.setdefault(scope, {})[key] = value
    else:
        body[scope] = value
    return body


@pytest.mark.parametrize("queue", ["sdxl_queue", "wan_queue", "chat_queue"])
def test_a_wrong_type_in_every_job_field_fails_the_job_as_invalid(fleet_a, standin, queue):
    expected: dict[str, str] = {}
    cases = [(path, values, drop) for path, values, drop in FIELDS[queue]] + [(p, v, ()) for p, v in TOP]
    for path, values, drop in cases:
        for i, value in enumerate(values):
            job_id = f"type-{queue[:4]}-{path.replace('.', '_')}-{i}-{RUN}"
            expected[job_id] = f"{path}={value!r:.30}"
            fleet_a.queue.push(queue, _with(job(queue, job_id), path, value, drop))
    huge = f"huge-{queue[:4]}-{RUN}"
    expected[huge] = "prompt of 50 000 characters"
    fleet_a.queue.push(queue, job(queue, huge, prompt="word " * 10_000) if queue != "chat_queue" else
                       _with(job(queue, huge), "config.messages", [{"role": "user", "content": "w" * 250_000}], ()))
    after = f"after-{queue[:4]}-{RUN}"  # a good job after the abuse, with unknown keys (ignored) everywhere
    unknown = {"conversation_id": "c-1", "destination": "x", "__proto__": {"admin": True}, "extra": [1, {"a": None}]}
    fleet_a.queue.push(queue, {**job(queue, after, metadata=dict(unknown), **unknown),
                               "config": {**SMALL[queue], **unknown}})
    bodies = wait_all(standin, [*expected, after], timeout=150)
    wrong = [f"{label}: {bodies[job_id]['status']} {bodies[job_id]['metadata'].get('error_type')}"
             for job_id, label in expected.items()
             if bodies[job_id]["status"] != "failed"
             or bodies[job_id]["metadata"]["error_type"] not in ("INVALID_JOB", "INVALID_PROMPT")]
    assert wrong == []
    for job_id in expected:
        assert_invalid(bodies[job_id], "INVALID_JOB", "INVALID_PROMPT")
    assert bodies[after]["status"] == "completed", bodies[after]
    assert "destination" not in bodies[after]["metadata"]  # a key the app owns is never sent back


UNDECODABLE = [b"{not json", b"\xff\xfe\x00\x81 not utf-8", b"[]", b'[{"id": "a"}, {"id": "b"}]', b'["not json"]',
               b"[5]", b'"a string"', b"null", b"12", b"[" * 50_000 + b"]" * 50_000,
               b'{"x":' * 50_000 + b"1" + b"}" * 50_000, b"\xef\xbb\xbf{}",
               b'{"id": "big-' + MARK.encode() + b'", "type": "sdxl_image_fast", "user_id": "u", "prompt": "'
               + b"a" * 1_100_000 + b'"}']


@pytest.mark.parametrize("queue", ["sdxl_queue", "wan_queue", "chat_queue"])
def test_undecodable_elements_go_to_the_dead_list_and_the_worker_carries_on(fleet_a, standin, queue):
    client = fleet_a.queue.redis()
    client.delete(f"{queue}:dead", f"{queue}:dead:log")
    for element in UNDECODABLE:
        client.rpush(queue, element)
    after = f"after-dead-{queue[:4]}-{RUN}"
    fleet_a.queue.push(queue, job(queue, after))
    assert wait_all(standin, [after], timeout=60)[after]["status"] == "completed"
    deadline = time.monotonic() + 10
    while client.llen(f"{queue}:dead") < len(UNDECODABLE) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.lrange(f"{queue}:dead", 0, -1) == UNDECODABLE
    for entry in client.lrange(f"{queue}:dead:log", 0, -1):
        reason = json.loads(entry)["reason"]
        assert reason.startswith("undecodable:") and len(reason) < 300 and "Traceback" not in reason
    assert not standin.callbacks(f"big-{MARK}")


def test_hostile_elements_over_upstash_rest_behave_the_same(fleet_b, standin):
    """The producer's path (``POST /rpush/<queue>``, body ``["{...}"]``) on the REST transport."""
    bad_user, bad_id = f"rest-user-{RUN}", f"../{MARK}"
    fleet_b.queue.push("sdxl_queue", job("sdxl_queue", bad_user, user_id=f"../{MARK}"))
    fleet_b.queue.push("sdxl_queue", job("sdxl_queue", "unused", id=bad_id))
    fleet_b.queue.push("wan_queue", job("wan_queue", f"rest-wan-{RUN}", config={"size": []}))
    bodies = wait_all(standin, [bad_user, f"rest-wan-{RUN}"], timeout=60)
    assert_invalid(bodies[bad_user])
    assert_invalid(bodies[f"rest-wan-{RUN}"])
    client = fleet_b.queue.redis()
    deadline = time.monotonic() + 10
    while not client.llen("sdxl_queue:dead") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(MARK.encode() in raw for raw in client.lrange("sdxl_queue:dead", 0, -1))
    if fleet_b.storage.exists():
        _assert_layout_only(fleet_b.storage)


def test_workers_still_healthy(fleet_a, fleet_b):
    for fleet in (fleet_a, fleet_b):
        for program in ("sdxl", "wan", "chat"):
            assert requests.get(fleet.url(program) + "/health", timeout=10).status_code == 200

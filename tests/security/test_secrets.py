"""No secret ever shows: the demo path (one job of each family, the HTTP APIs, errors, registration, a clean
SIGTERM stop) on two fleets whose every secret is a distinctive ``SEKRET-…`` value, then a scan of every log
line (the orchestrator's stdout, which carries every child's output, and LOG_DIR), every HTTP response
body and header collected (the ops page and its JSON included, which must not show a job's prompt either), and
every callback body. Raw, base64 and URL-encoded forms are all searched.

This module runs last in tests/security (it stops the fleets to include the shutdown logs).
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import requests

from .fleet import ADMIN_KEY, CHAT_KEY, SECRETS, WAN_KEY, wait_all

RUN = uuid.uuid4().hex[:8]


def forms(secret: str) -> set[str]:
    core = secret.split("SEKRET-", 1)[1]
    return {secret, core, quote(secret, safe=""), base64.b64encode(secret.encode()).decode().rstrip("="),
            base64.b64encode(f":{secret}".encode()).decode().rstrip("=")}


NEEDLES = {name: forms(value) for name, value in SECRETS.items()}


def leaks(text: str) -> list[str]:
    return [f"{name} ({form[:12]}…)" for name, needles in NEEDLES.items() for form in needles if form in text]


def demo_jobs(refs) -> list[tuple[str, dict]]:
    small_sdxl = {"resolution": "64x64", "num_inference_steps": 2}
    small_wan = {"size": "64*64", "num_inference_steps": 2}
    ref = refs.url("127.0.0.1", f"/image.png?m=secrets-{RUN}")
    return [
        ("sdxl_queue", {"type": "sdxl_image_fast", "prompt": "a lighthouse",
                        "config": {**small_sdxl, "num_images": 3}}),
        ("sdxl_queue", {"type": "sdxl_image_high", "prompt": "watercolour", "config": small_sdxl,
                        "metadata": {"reference_image_url": ref}}),
        ("sdxl_queue", {"type": "sdxl_image_fast", "prompt": "blocked ref", "config": small_sdxl,
                        "metadata": {"reference_image_url": f"http://localhost:{refs.port}/x.png"}}),
        ("sdxl_queue", {"type": "sdxl_image_fast", "prompt": "bad", "config": {"num_inference_steps": "many"}}),
        ("wan_queue", {"type": "video_fast", "job_type": "wan_video_fast", "prompt": "waves",
                       "config": {**small_wan, "frame_num": 5}}),
        ("wan_queue", {"type": "image_fast", "prompt": "a fox", "config": {**small_wan, "image": ref}}),
        ("wan_queue", {"type": "video7b_fast_enhanced", "prompt": "a city", "config": {**small_wan, "frame_num": 5}}),
        ("chat_queue", {"type": "chat_conversation", "config": {"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 4}}),
        ("chat_queue", {"type": "chat_enhance", "prompt": "a cat", "config": {"max_tokens": 4}}),
    ]


def collect_http(fleet) -> list[str]:
    """Bodies and headers of every informational route, with and without keys, and of typical errors."""
    seen = []
    client, admin = {"Authorization": f"Bearer {CHAT_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
    gets = {
        "router": ["/health", "/router/health", "/openapi.json", "/debug/env", "/memory/status", "/sdxl/status",
                   "/sdxl/debug/env", "/wan/status", "/wan/metrics", "/nope", "/sdxl/nope", "/ops", "/ops/data"],
        "chat": ["/health", "/status", "/metrics", "/memory/status", "/debug/env", "/worker/info", "/debug/model",
                 "/enhancement/info", "/v1/models", "/openapi.json"],
        "wan": ["/health", "/status", "/debug/env", "/memory/status"],
        "sdxl": ["/health", "/status", "/debug/env", "/memory/status"],
        "memory_manager": ["/health", "/memory/status", "/memory/report"],
    }
    for program, paths in gets.items():
        for path in paths:
            for headers in ({}, client, admin, {"Authorization": "Bearer wrong"}):
                seen.append(_record(requests.get(fleet.url(program) + path, headers=headers, timeout=30)))
    posts = [("chat", "/chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
             ("chat", "/chat", {"messages": []}), ("chat", "/v1/chat/completions", {"messages": "x"}),
             ("router", "/enhance", {"prompt": "a cat"}), ("router", "/enhance", {"prompt": ""}),
             ("router", "/wan/memory/load", {"which": 5}), ("memory_manager", "/reservations", {"worker": "x"}),
             ("memory_manager", "/emergency/operation", {"operation": "status"})]
    for program, path, body in posts:
        for headers in ({}, client, admin, {"Authorization": f"Bearer {WAN_KEY}"}):
            seen.append(_record(requests.post(fleet.url(program) + path, json=body, headers=headers, timeout=60)))
    seen.append(_record(requests.post(fleet.url("chat") + "/chat", data=b"x" * (2 * 1024 * 1024),
                                      headers=client, timeout=60)))
    seen.append(_record(requests.get(f"http://127.0.0.1:{fleet.status_port}/status", timeout=10)))
    return seen


def ops_page(fleet, jobs: int) -> list[str]:
    """The ops page and its JSON as a browser gets them (HTTP Basic, the admin key as password), once the
    collector has had a round after the jobs: its recent jobs show all ``jobs`` of this test (their journal
    records carry the first 8 characters of the id, ``secret-<fleet>``)."""
    basic = {"Authorization": "Basic " + base64.b64encode(f"ops:{ADMIN_KEY}".encode()).decode()}
    prefix = f"secret-{fleet.name}"[:8]
    deadline = time.monotonic() + 20   # a collector round is every OPS_COLLECT_SECONDS (5 s)
    while True:
        data = requests.get(fleet.url("router") + "/ops/data", headers=basic, timeout=30)
        assert data.status_code == 200, data.text[:300]
        if sum(1 for job in data.json()["jobs"]["recent"] if job["id"] == prefix) >= jobs:
            break
        assert time.monotonic() < deadline, f"the ops data never showed this test's {jobs} jobs: {data.text[:300]}"
        time.sleep(0.5)
    page = requests.get(fleet.url("router") + "/ops", headers=basic, timeout=30)
    assert page.status_code == 200, page.text[:300]
    return [_record(data), _record(page)]


def _record(answer: requests.Response) -> str:
    return f"{answer.request.method} {answer.url} {answer.status_code}\n{dict(answer.headers)}\n{answer.text}"


def test_no_secret_in_logs_responses_or_callbacks(fleets, refs, standin):
    job_ids = []
    for fleet in fleets.values():
        for queue, body in demo_jobs(refs):
            job_id = f"secret-{fleet.name}-{len(job_ids)}-{RUN}"
            fleet.queue.push(queue, {"id": job_id, "user_id": "secret-user", **body})
            job_ids.append(job_id)
    bodies = wait_all(standin, job_ids, timeout=150)
    # failures: the invalid job on both fleets, and the blocked reference on fleet B (REFERENCE_FAILURE_POLICY=fail)
    assert sorted(b["status"] for b in bodies.values()) == ["completed"] * 15 + ["failed"] * 3, bodies
    ops = {name: ops_page(fleet, len(demo_jobs(refs))) for name, fleet in fleets.items()
           if name == "a"}   # fleet B has no admin key
    prompts = {body["prompt"] for _, body in demo_jobs(refs) if len(body.get("prompt", "")) >= 5}
    assert [p for texts in ops.values() for text in texts for p in prompts if p in text] == []
    responses = [text for fleet in fleets.values() for text in collect_http(fleet)]
    responses += [text for texts in ops.values() for text in texts]
    env_report = requests.get(fleets["a"].url("router") + "/debug/env", timeout=30,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert env_report["settings_set"]["WORKER_ADMIN_KEY"] is True
    assert all(isinstance(v, bool) for v in env_report["settings_set"].values())
    callbacks = [c.raw.decode("utf-8", "replace") for c in standin.callbacks()]
    # the scanner works: the callbacks' own headers do carry the service key (as they must)
    assert any(leak.startswith("SUPABASE_SERVICE_KEY") for leak in leaks(json.dumps(standin.callbacks()[0].headers)))
    registrations = [json.dumps(r.body) for r in standin.registrations]
    assert any(r.accepted for r in standin.registrations), "fleet A registers (PUBLIC_BASE_URL)"
    with ThreadPoolExecutor(len(fleets)) as pool:   # both at once: each stop waits for its workers' exits
        exit_codes = dict(zip(fleets, pool.map(lambda fleet: fleet.stop(), fleets.values())))
    assert exit_codes == {"a": 0, "b": 0}
    logs = {name: fleet.log_text() for name, fleet in fleets.items()}
    assert all(len(text) > 1000 for text in logs.values())
    found = {
        "logs": {name: leaks(text) for name, text in logs.items() if leaks(text)},
        "responses": sorted({leak for text in responses for leak in leaks(text)}),
        "callbacks": sorted({leak for text in callbacks + registrations for leak in leaks(text)}),
    }
    assert found == {"logs": {}, "responses": [], "callbacks": []}

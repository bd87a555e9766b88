"""Load on the whole fleet under the orchestrator: a burst of 1,000 queued jobs (fake handler in the real worker
processes), and 200 concurrent HTTP requests on the chat worker (tiny real Qwen) and on the router."""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .conftest import CLIENT_KEY
from .jobs import QUEUES, assert_drained, fake_element, new_id, percentile

CONCURRENCY = 200


@pytest.mark.timeout(240)
def test_1000_jobs_at_once_across_three_queues_all_complete_once(fake_fleet, report):
    """Injects: 1,000 jobs pushed in one pipeline across sdxl_queue, wan_queue and chat_queue (fast fake
    handler; each job uploads a PNG and a thumbnail to Supabase Storage and sends two callbacks). Asserts:
    every job has exactly one completed callback and no failed one; queues, processing lists and outbox end
    empty. Prints throughput and p50/p99 latency from the push to the completed callback's arrival."""
    rig = fake_fleet
    jobs = {new_id(f"load-{n}"): QUEUES[n % 3] for n in range(1000)}
    pipe = rig.client.pipeline(transaction=False)
    for queue in QUEUES:
        pipe.rpush(queue, *[fake_element(job_id, queue) for job_id, q in jobs.items() if q == queue])
    pushed = time.time()
    pipe.execute()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        done = rig.standin.callbacks(status="completed")
        if sum(1 for c in done if c.job_id in jobs) >= len(jobs):
            break
        time.sleep(0.2)
    completed = [c for c in rig.standin.callbacks(status="completed") if c.job_id in jobs]
    assert_drained(rig.client)
    counts = Counter(c.job_id for c in completed)
    assert set(counts) == set(jobs), f"{len(set(jobs) - set(counts))} job(s) never completed"
    assert max(counts.values()) == 1, [j for j, n in counts.items() if n > 1][:5]
    assert not [c for c in rig.standin.callbacks(status="failed") if c.job_id in jobs]
    latencies = [c.at - pushed for c in completed]
    span = max(latencies)
    per_queue = Counter(jobs[c.job_id] for c in completed)
    assert per_queue == Counter(jobs.values())
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    report("1,000 queued jobs", f"all completed once in {span:.1f} s = {len(jobs) / span:.0f} jobs/s; latency "
           f"push→completed p50 {p50:.2f} s, p99 {p99:.2f} s", jobs_per_s=round(len(jobs) / span, 1),
           job_latency_p50_s=round(p50, 3), job_latency_p99_s=round(p99, 3))


def burst(calls: list) -> tuple[list[int], list[float], float]:
    """Run ``calls`` (each returning a ``requests.Response``) all at once; statuses, latencies, wall time."""
    gate = threading.Barrier(len(calls))
    local = threading.local()

    def one(call):
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.trust_env = False
        gate.wait()
        began = time.monotonic()
        try:
            status = call(local.session).status_code
        except requests.RequestException as exc:
            status = f"{type(exc).__name__}"
        return status, time.monotonic() - began

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        results = list(pool.map(one, calls))
    return [s for s, _ in results], [t for _, t in results], time.monotonic() - started


@pytest.mark.timeout(240)
def test_200_concurrent_chat_requests_on_the_tiny_real_qwen(model_fleet, report):
    """Injects: 200 simultaneous ``POST /chat`` on the chat worker (tiny random Qwen, max_tokens 8).
    Asserts: 200 answers of 200 with a response, no error and no 5xx. Prints latencies."""
    url = model_fleet.fleet.url("chat") + "/chat"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    answers: list[dict] = []

    def call(n: int):
        def run(session: requests.Session) -> requests.Response:
            body = {"messages": [{"role": "user", "content": f"Describe picture number {n}"}], "max_tokens": 8,
                    "temperature": 0.7}
            answer = session.post(url, json=body, headers=headers, timeout=180)
            if answer.status_code == 200:
                answers.append(answer.json())
            return answer
        return run

    statuses, latencies, wall = burst([call(n) for n in range(CONCURRENCY)])
    assert Counter(statuses) == {200: CONCURRENCY}, Counter(statuses)
    assert len(answers) == CONCURRENCY and all(a["success"] is True and isinstance(a["response"], str)
                                               for a in answers)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    report("200 concurrent /chat", f"all 200 in {wall:.1f} s; latency p50 {p50:.2f} s, p99 {p99:.2f} s, "
           f"max {max(latencies):.2f} s", chat_p50_s=round(p50, 3), chat_p99_s=round(p99, 3),
           chat_wall_s=round(wall, 2))


@pytest.mark.timeout(240)
def test_200_concurrent_requests_on_the_router(model_fleet, report):
    """Injects: 200 simultaneous requests on the router (port 7860's role): 50 each of ``GET /health`` (which
    asks both workers), ``GET /wan/health``, ``GET /sdxl/status`` and ``POST /enhance`` (router → WAN worker →
    chat worker's tiny real Qwen). Asserts: every answer is 200 (no 5xx, no connection error) and each
    /enhance answer carries an enhanced prompt. Prints latencies per path."""
    router = model_fleet.fleet.url("router")
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    enhanced: list[dict] = []

    def enhance(session: requests.Session) -> requests.Response:
        answer = session.post(f"{router}/enhance", json={"prompt": "a cat on a roof"}, headers=headers, timeout=120)
        if answer.status_code == 200:
            enhanced.append(answer.json())
        return answer

    kinds = {
        "/health": lambda s: s.get(f"{router}/health", timeout=60),
        "/wan/health": lambda s: s.get(f"{router}/wan/health", timeout=60),
        "/sdxl/status": lambda s: s.get(f"{router}/sdxl/status", timeout=60),
        "/enhance": enhance,
    }
    calls, labels = [], []
    for n in range(CONCURRENCY):
        label = list(kinds)[n % len(kinds)]
        calls.append(kinds[label])
        labels.append(label)
    statuses, latencies, wall = burst(calls)
    by_path = {label: Counter(s for s, lab in zip(statuses, labels) if lab == label) for label in kinds}
    assert all(counts == {200: CONCURRENCY // len(kinds)} for counts in by_path.values()), by_path
    assert len(enhanced) == CONCURRENCY // len(kinds)
    assert all(e["success"] is True and e["enhanced_prompt"] for e in enhanced)
    summary = ", ".join(
        f"{label} p50 {percentile([t for t, lab in zip(latencies, labels) if lab == label], 0.5):.2f} s / p99 "
        f"{percentile([t for t, lab in zip(latencies, labels) if lab == label], 0.99):.2f} s" for label in kinds)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    report("200 concurrent router requests", f"all 200 answered 200 in {wall:.1f} s; {summary}",
           router_p50_s=round(p50, 3), router_p99_s=round(p99, 3), router_wall_s=round(wall, 2))

"""The ops page's arithmetic (router/ops_stats.py): percentiles, per-minute job series, chat rates, the pod."""
from __future__ import annotations

import pytest

from router.ops_stats import ChatRates, job_summary, percentile, pod_now, ring


def job(t: float, seconds: float | None, outcome: str = "completed", kind: str = "sdxl_image_fast") -> dict:
    return {"id": "abcdefgh", "type": kind, "outcome": outcome, "seconds": seconds, "worker": "w", "attempt": 1,
            "error_type": None if outcome == "completed" else "OOM_ERROR", "t": t}


@pytest.mark.parametrize("values, q, expected", [
    ([], 50, None), ([3.0], 95, 3.0), ([1, 2, 3, 4], 50, 2.5), (list(range(1, 101)), 95, 95.05),
    ([5, 1, 3], 0, 1.0), ([5, 1, 3], 100, 5.0)])
def test_percentiles_interpolate_between_ranks(values, q, expected):
    assert percentile([float(v) for v in values], q) == expected


def test_a_ring_keeps_the_newest_samples():
    buffer = ring(3)
    buffer.extend(range(10))
    assert list(buffer) == [7, 8, 9]


def test_jobs_are_summarised_per_type_and_minute_over_the_window():
    now = 10_000.0
    jobs = [job(now - 4000, 9.0),                                   # older than the hour: left out
            job(6420.0, 1.0), job(6430.0, 3.0), job(6440.0, None, "failed"),
            job(9990.0, 2.0), job(9995.0, None, "dead"), job(9996.0, 0.5, kind="chat_conversation")]
    summary = job_summary(jobs, now, 3600.0)
    assert summary["bucket_seconds"] == 60.0
    chat, sdxl = summary["types"]
    assert (chat["type"], chat["count"], chat["p50_seconds"]) == ("chat_conversation", 1, 0.5)
    assert (sdxl["count"], sdxl["completed"], sdxl["failed"]) == (5, 3, 2)
    assert (sdxl["p50_seconds"], sdxl["p95_seconds"]) == (2.0, 2.9)
    assert sdxl["per_minute"] == [
        {"t": 6420.0, "completed": 2, "failed": 1, "p50_seconds": 2.0, "p95_seconds": 2.9},
        {"t": 9960.0, "completed": 1, "failed": 1, "p50_seconds": 2.0, "p95_seconds": 2.0}]


def test_chat_rates_come_from_counter_deltas_and_survive_a_worker_restart():
    rates = ChatRates()
    engine = {"active": 2, "waiting": 1, "tokens": 100, "first_tokens": 4, "ttft_seconds_total": 0.8}
    assert rates.sample(100.0, engine) == (2, 1, None, None)
    engine = {**engine, "tokens": 300, "first_tokens": 6, "ttft_seconds_total": 1.4}
    assert rates.sample(110.0, engine) == (2, 1, 20.0, 0.3)
    assert rates.sample(120.0, engine) == (2, 1, 0.0, None)          # nothing new: no first token to average
    restarted = {"active": 0, "waiting": 0, "tokens": 50, "first_tokens": 1, "ttft_seconds_total": 0.2}
    assert rates.sample(130.0, restarted) == (0, 0, 5.0, 0.2)


def test_the_pod_reading_has_cpu_memory_and_labelled_disks():
    pod = pod_now({"/": "/", "again": "/"})
    assert 0 <= pod["cpu_percent"] <= 100 * pod["cpu_count"]
    assert pod["memory"]["total_bytes"] > pod["memory"]["used_bytes"] > 0
    assert [d["label"] for d in pod["disks"]] == ["/"]    # one filesystem, shown once
    assert pod["disks"][0]["total_bytes"] > 0 and "path" not in pod["disks"][0]

"""Jobs as the app's producer pushes them, and the checks every fleet test ends with: each job reached exactly
one terminal callback of the expected kind, and the queues, processing lists and outbox are empty."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from common import keys
from local.supabase_standin import SupabaseStandin

QUEUES = ("sdxl_queue", "wan_queue", "chat_queue")
FAKE_TYPES = {"sdxl_queue": "sdxl_image_fast", "wan_queue": "image_fast", "chat_queue": "chat_conversation"}
USER = "fleet-user"
COMPLETED = "completed"
TERMINAL = ("completed", "failed")


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def element(job_id: str, job_type: str, prompt: str = "a lighthouse", config: Mapping[str, Any] | None = None,
            metadata: Mapping[str, Any] | None = None) -> str:
    """The current producer's form: a JSON array holding the job's JSON text (CONTRACT §1)."""
    job = {"id": job_id, "type": job_type, "user_id": USER, "prompt": prompt, "config": dict(config or {}),
           "metadata": dict(metadata or {})}
    return json.dumps([json.dumps(job)])


def fake_element(job_id: str, queue: str, **config: Any) -> str:
    return element(job_id, FAKE_TYPES[queue], config=config)


def terminal(standin: SupabaseStandin, job_id: str) -> list:
    return [c for c in standin.callbacks(job_id) if c.status in TERMINAL]


def wait_terminal(standin: SupabaseStandin, job_ids: Iterable[str], timeout: float) -> None:
    pending = set(job_ids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = {j for j in pending if not terminal(standin, j)}
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no terminal callback within {timeout:g} s for {len(pending)} job(s), "
                                 f"e.g. {sorted(pending)[:5]}")
        time.sleep(0.1)


def held(client: redis.Redis) -> dict[str, int]:
    """Processing lists that hold something: key → length."""
    found = {}
    for key in client.keys("*:processing:*"):
        length = client.llen(key)
        if length:
            found[key.decode()] = length
    return found


def dead_ids(client: redis.Redis, queue: str) -> list[str | None]:
    return [json.loads(e)["job_id"] for e in client.lrange(keys.dead_log(queue), 0, -1)]


def assert_drained(client: redis.Redis, timeout: float = 15.0) -> None:
    """Every queue, every processing list and the outbox empty (an ack follows its callback by a moment)."""
    def state():
        return ({q: client.llen(q) for q in QUEUES if client.llen(q)}, held(client), client.hlen(keys.OUTBOX))
    deadline = time.monotonic() + timeout
    while any(state()) and time.monotonic() < deadline:
        time.sleep(0.1)
    queues, processing, outbox = state()
    assert queues == {}, f"jobs left waiting: {queues}"
    assert processing == {}, f"jobs left in processing lists: {processing}"
    assert outbox == 0, "terminal callbacks left in the outbox"


def assert_exactly_once(standin: SupabaseStandin, expected: Mapping[str, str]) -> None:
    """``expected``: job id → ``"completed"`` or the ``error_type`` of its one ``failed`` callback."""
    problems = []
    for job_id, outcome in expected.items():
        got = terminal(standin, job_id)
        if outcome == COMPLETED:
            ok = [c.status for c in got] == [COMPLETED]
        else:
            ok = [c.status for c in got] == ["failed"] and got[0].body["metadata"].get("error_type") == outcome
        if not ok:
            problems.append((job_id, outcome, [(c.status, c.body["metadata"].get("error_type")) for c in got]))
    assert not problems, f"jobs without exactly one expected terminal callback: {problems[:10]}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]

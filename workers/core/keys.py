"""Every Redis key the fleet uses, with its type and lifetime (DESIGN style 7). Nothing else builds key names.

| key | type | lifetime | meaning |
|---|---|---|---|
| ``<queue>`` | list | permanent | waiting jobs only (ops read ``LLEN``); producers RPUSH |
| ``<queue>:processing:<worker_id>`` | list | until acked or reaped | the job a worker holds (at most one) |
| ``<queue>:attempts`` | hash job_id → int | field removed at the terminal state | attempts started per job |
| ``<queue>:dead`` | list | permanent (ops drain it) | raw elements that will not be run again |
| ``<queue>:dead:log`` | list of JSON, capped at 1000 | permanent | why each element was dead-lettered |
| ``workers:active`` | set of ``<queue>|<worker_id>`` | member removed when reaped | workers that may hold a processing list |
| ``worker:<worker_id>:heartbeat`` | string | TTL = heartbeat TTL | present while the worker is alive |
| ``job:<job_id>:done`` | string | 7 days | the job's terminal callback was delivered or recorded: never run it again |
| ``callbacks:outbox`` | hash job_id → body | until delivered | terminal callbacks that could not be delivered yet |
"""
from __future__ import annotations

DONE_TTL_SECONDS = 7 * 24 * 3600
DEAD_LOG_MAX = 1000
ACTIVE_WORKERS = "workers:active"
OUTBOX = "callbacks:outbox"


def processing(queue: str, worker_id: str) -> str:
    return f"{queue}:processing:{worker_id}"


def attempts(queue: str) -> str:
    return f"{queue}:attempts"


def dead(queue: str) -> str:
    return f"{queue}:dead"


def dead_log(queue: str) -> str:
    return f"{queue}:dead:log"


def heartbeat(worker_id: str) -> str:
    return f"worker:{worker_id}:heartbeat"


def done(job_id: str) -> str:
    return f"job:{job_id}:done"


def active_member(queue: str, worker_id: str) -> str:
    return f"{queue}|{worker_id}"


def parse_active_member(member: str) -> tuple[str, str]:
    queue, _, worker_id = member.partition("|")
    return queue, worker_id

"""Every Redis key the fleet uses, with its type and lifetime. Nothing else builds key names.

In the kernel because two kinds of process use them: the workers' job runtime (``workers/core``) writes
them, and the router's ops page (``router/collector.py``) reads queue depths and the job journal.

| key | type | lifetime | meaning |
|---|---|---|---|
| ``<queue>`` | list | permanent | waiting jobs only (ops read ``LLEN``); producers RPUSH |
| ``<queue>:processing:<worker_id>`` | list | until settled, handed back or reaped | the job a worker holds (at most one); the reaper finds it through ``workers:active`` or, every few reaps, a SCAN |
| ``<queue>:attempts`` | hash job_id → int | field removed at the terminal state | attempts started per job |
| ``<queue>:dead`` | list | permanent (ops drain it) | raw elements that will not be run again |
| ``<queue>:dead:log`` | list of JSON, capped at 1000 | permanent | why each element was dead-lettered |
| ``workers:active`` | set of ``<queue>|<worker_id>`` | member removed when reaped | workers that may hold a processing list |
| ``worker:<worker_id>:heartbeat`` | string | TTL = heartbeat TTL | present while the worker is alive |
| ``job:<job_id>:done`` | string | 7 days | the job reached its terminal state (set with its outbox entry): never run it again |
| ``job:<job_id>:claim`` | string ``<worker_id>:<attempt>`` | TTL = 3 × heartbeat TTL, renewed by the heartbeat while the job runs; deleted at the terminal step | who runs the job now: a second copy does not start while it lives; a worker whose claim was taken over neither uploads nor sends a terminal callback (fencing by attempt) |
| ``callbacks:outbox`` | hash job_id → body | until delivered (or rejected) | terminal callbacks owed to the app; written atomically with the job leaving its processing list, before the runner delivers it itself |
| ``callbacks:outbox:lease:<job_id>`` | string owner id | TTL: a sender's, 2 × one POST; the runner's (set by the terminal step), its whole delivery budget + a margin; deleted when the holder is done | the one sender now delivering this outbox entry: other senders skip it |
| ``callbacks:rejected`` | hash job_id → body | permanent (ops replay or drop it) | terminal callbacks the app refused with a 4xx (e.g. a rotated secret), kept for a manual replay |
| ``jobs:journal`` | list of JSON, newest first, capped at 2000 | permanent (capped) | one small record per terminal outcome (id prefix, type, outcome, duration, worker, attempt, error type; never user text), for the ops page |
"""
from __future__ import annotations

DONE_TTL_SECONDS = 7 * 24 * 3600
DEAD_LOG_MAX = 1000
ACTIVE_WORKERS = "workers:active"
OUTBOX = "callbacks:outbox"
REJECTED = "callbacks:rejected"
JOURNAL = "jobs:journal"
JOURNAL_MAX = 2000
#: The job queues (``workers.core.job.Queue``'s values): the ops page reads their depths.
QUEUES = ("sdxl_queue", "wan_queue", "chat_queue")


def processing(queue: str, worker_id: str) -> str:
    return f"{queue}:processing:{worker_id}"


#: SCAN pattern of every processing list (the reaper's search for lists no registry entry points at).
PROCESSING_PATTERN = "*:processing:*"


def parse_processing(key: str) -> tuple[str, str]:
    """``<queue>:processing:<worker_id>`` → ``(queue, worker_id)``."""
    queue, _, worker_id = key.partition(":processing:")
    return queue, worker_id


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


def claim(job_id: str) -> str:
    return f"job:{job_id}:claim"


def outbox_lease(job_id: str) -> str:
    return f"{OUTBOX}:lease:{job_id}"

"""The reliable list consumer (CONTRACT §1): nothing taken from a queue is ever lost.

A job is moved atomically from ``<queue>`` into this worker's processing list, and leaves it only through
one of the atomic scripts below: ``finish`` (terminal callback delivered), ``finish_to_outbox`` (terminal
callback durably recorded), ``hand_back`` (to the head of the queue), ``dead_letter``. A heartbeat key
with a TTL marks the worker alive; ``reap`` returns the processing lists of workers whose heartbeat expired
to the head of their queues, oldest first.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from . import keys
from .transport import Transport

log = logging.getLogger(__name__)

# KEYS[1]=processing ARGV[1]=raw ARGV[2]=job_id|'' ; plus per-script extras.
_FINISH = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[3]))
end
if KEYS[4] then redis.call('HSET', KEYS[4], ARGV[2], ARGV[4]) end
return removed
"""
_HAND_BACK = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed > 0 then
  if ARGV[2] == 'left' then redis.call('LPUSH', KEYS[2], ARGV[1]) else redis.call('RPUSH', KEYS[2], ARGV[1]) end
  if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[3], -1) end
end
return removed
"""
_DEAD_LETTER = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
  if ARGV[4] ~= '' then
    redis.call('HDEL', KEYS[4], ARGV[4])
    redis.call('SET', KEYS[5], '1', 'EX', tonumber(ARGV[5]))
  end
end
return removed
"""
# Oldest element sits at the left of the processing list; return them so the oldest ends up first.
_RETURN_ALL = """
local moved = 0
while true do
  local item
  if ARGV[1] == 'left' then item = redis.call('RPOP', KEYS[1]) else item = redis.call('LPOP', KEYS[1]) end
  if not item then break end
  if ARGV[1] == 'left' then redis.call('LPUSH', KEYS[2], item) else redis.call('RPUSH', KEYS[2], item) end
  moved = moved + 1
end
return moved
"""


@dataclass(frozen=True)
class Delivery:
    """One element taken from the queue, exactly as stored (``raw``), for exact acknowledgement."""

    raw: bytes
    queue: str


class ReliableQueue:
    def __init__(self, transport: Transport, queue: str, worker_id: str, side: str = "left",
                 heartbeat_ttl: int = 30, poll_min: float = 0.1, poll_max: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if side not in ("left", "right"):
            raise ValueError("side must be 'left' or 'right'")
        self.transport = transport
        self.queue = queue
        self.worker_id = worker_id
        self.side = side
        self.heartbeat_ttl = heartbeat_ttl
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.sleep = sleep
        self.clock = clock
        self._suspects: dict[str, float] = {}   # member → when its heartbeat was first seen missing
        self.processing = keys.processing(queue, worker_id)
        self._idle_polls = 0

    # -- taking work ---------------------------------------------------------------------------
    def fetch(self, wait: float | None = None) -> Delivery | None:
        """Move the next job into the processing list; ``None`` if none arrived within about ``wait``."""
        wait = self.poll_max if wait is None else wait
        if self.transport.can_block:
            raw = self.transport.blocking_move(self.queue, self.processing, self.side, max(wait, 0.01))
        else:
            raw = self.transport.command("LMOVE", self.queue, self.processing, self.side.upper(), "RIGHT")
            if raw is None:
                # REST cannot block: back off from poll_min up to poll_max while idle.
                self._idle_polls += 1
                self.sleep(min(self.poll_max, self.poll_min * 2 ** min(self._idle_polls - 1, 10), wait))
        if raw is None:
            return None
        self._idle_polls = 0
        return Delivery(raw=raw, queue=self.queue)

    def count_attempt(self, job_id: str) -> int:
        return int(self.transport.command("HINCRBY", keys.attempts(self.queue), job_id, 1))

    def already_done(self, job_id: str) -> bool:
        return bool(self.transport.command("EXISTS", keys.done(job_id)))

    # -- leaving the processing list (each atomic) ---------------------------------------------
    def finish(self, delivery: Delivery, job_id: str | None) -> None:
        """Ack after the terminal callback was delivered: remove, forget attempts, mark done."""
        self._script(_FINISH, [self.processing, keys.attempts(self.queue), keys.done(job_id or "-")],
                     [delivery.raw, job_id or "", keys.DONE_TTL_SECONDS])

    def finish_to_outbox(self, delivery: Delivery, job_id: str, body: bytes) -> None:
        """Ack while recording the undelivered terminal callback in the outbox, in one step."""
        self._script(_FINISH, [self.processing, keys.attempts(self.queue), keys.done(job_id), keys.OUTBOX],
                     [delivery.raw, job_id, keys.DONE_TTL_SECONDS, body])

    def record_callback(self, job_id: str, body: bytes) -> None:
        """Keep an undelivered terminal callback of a job that already left the processing list."""
        self.transport.command("HSET", keys.OUTBOX, job_id, body)

    def hand_back(self, delivery: Delivery, job_id: str | None = None, count_attempt: bool = False) -> None:
        """Return the job to the head of its queue (the attempt is not counted unless asked)."""
        self._script(_HAND_BACK, [self.processing, self.queue, keys.attempts(self.queue)],
                     [delivery.raw, self.side, "" if count_attempt or not job_id else job_id])

    def dead_letter(self, delivery: Delivery, reason: str, job_id: str | None) -> None:
        entry = json.dumps({"job_id": job_id, "reason": reason, "worker_id": self.worker_id,
                            "at": time.time()})
        self._script(_DEAD_LETTER, [self.processing, keys.dead(self.queue), keys.dead_log(self.queue),
                                    keys.attempts(self.queue), keys.done(job_id or "-")],
                     [delivery.raw, entry, keys.DEAD_LOG_MAX, job_id or "", keys.DONE_TTL_SECONDS])
        log.warning("dead-lettered an element of %s (job %s): %s", self.queue, job_id or "unknown", reason)

    # -- liveness ------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        self.transport.command("SET", keys.heartbeat(self.worker_id), str(time.time()), "EX", self.heartbeat_ttl)
        self.transport.command("SADD", keys.ACTIVE_WORKERS, keys.active_member(self.queue, self.worker_id))

    def recover_own(self) -> int:
        """At start: a previous life of this worker id may have died holding a job; return it."""
        moved = self._return_all(self.processing, self.queue)
        if moved:
            log.warning("returned %d job(s) left by a previous run of %s to %s", moved, self.worker_id, self.queue)
        return moved

    def reap(self) -> int:
        """Return the jobs of every worker whose heartbeat has been missing for a whole TTL (seen by this
        reaper) to the head of their queue. The second TTL of grace covers a Redis restart, after which every
        live worker's heartbeat is gone until its next beat: a running job is not handed out twice."""
        moved = 0
        now = self.clock()
        members = [m.decode() if isinstance(m, bytes) else m
                   for m in self.transport.command("SMEMBERS", keys.ACTIVE_WORKERS) or []]
        self._suspects = {m: t for m, t in self._suspects.items() if m in members}
        for member in members:
            queue, worker_id = keys.parse_active_member(member)
            if worker_id == self.worker_id or self.transport.command("EXISTS", keys.heartbeat(worker_id)):
                self._suspects.pop(member, None)
                continue
            if now - self._suspects.setdefault(member, now) < self.heartbeat_ttl:
                continue
            del self._suspects[member]
            count = self._return_all(keys.processing(queue, worker_id), queue)
            self.transport.command("SREM", keys.ACTIVE_WORKERS, member)
            if count:
                log.warning("reaped %d job(s) of dead worker %s back to %s", count, worker_id, queue)
            moved += count
        return moved

    def retire(self) -> None:
        """On a clean exit with nothing held: forget this worker's liveness keys."""
        self.transport.command("DEL", keys.heartbeat(self.worker_id))
        if not self.transport.command("LLEN", self.processing):
            self.transport.command("SREM", keys.ACTIVE_WORKERS, keys.active_member(self.queue, self.worker_id))

    def depth(self) -> int:
        return int(self.transport.command("LLEN", self.queue))

    def _return_all(self, processing: str, queue: str) -> int:
        return int(self._script(_RETURN_ALL, [processing, queue], [self.side]))

    def _script(self, script: str, script_keys: list[str], args: list) -> int:
        return self.transport.command("EVAL", script, len(script_keys), *script_keys, *args)

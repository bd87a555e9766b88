"""The reliable list consumer (CONTRACT §1): nothing taken from a queue is lost, and no job runs twice at once.

An element's life, each step one atomic Lua script (one round trip):

- ``fetch``: ``LMOVE``/``BLMOVE`` from ``<queue>`` into this worker's processing list. A move that fails or
  whose reply comes late raises ``TransportError`` (the move may have happened) and the next ``fetch`` first
  returns whatever the processing list holds to the queue.
- ``begin`` (after decoding): a copy of a finished job (done marker) is dropped; a copy another worker holds
  the claim of goes back to the *tail* of the queue; otherwise the attempt is counted and the claim
  ``job:<id>:claim`` = ``<worker_id>:<attempt>`` taken (TTL 3 × heartbeat TTL, renewed by ``renew_claim``).
- ``settle``, the terminal step, only while the claim is ours (fencing): remove the element (to the dead list
  if asked), forget the attempts, set the done marker, write the owed callback into ``callbacks:outbox``
  under this worker's lease, drop the claim. The callback is durable before the element leaves; the runner
  delivers it afterwards. If the claim is not ours, nothing is written and the element, if still here, goes
  back to the head of the queue.
- ``hand_back``: to the head of the queue; the attempt is undone only if this worker counted it.
- ``dead_letter``: for undecodable elements (no job id).

A heartbeat key with a TTL marks the worker alive; ``reap`` returns the processing lists of workers whose
heartbeat has been missing for a TTL to the head of their queues, oldest first. It finds them through
``workers:active`` and, every few reaps, a SCAN for lists no registry entry points at (a move that landed
after its worker retired).

Scripts name the element by its bytes, or by their SHA-1 when they are not UTF-8: Upstash REST carries
arguments as JSON text and cannot send such an element back (review #10).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from common import keys

from .transport import Transport, TransportError

log = logging.getLogger(__name__)

CLAIM_TTL_HEARTBEATS = 3   # a claim outlives three missed heartbeats: longer than the reaper's grace
CLAIM_SURE_FRACTION = 0.5  # within half its TTL of being taken or renewed, a claim is known to be ours without asking
ORPHAN_SCAN_EVERY = 10     # reaps between SCANs for processing lists outside the registry
SCAN_COUNT = 10_000        # keys per SCAN step: the 7-day done markers make the keyspace large

# Every script: ARGV[1] names the element (its bytes, or their SHA-1 when ARGV[2] == 'sha1').
_ELEMENT = """
local function find(list)
  if ARGV[2] ~= 'sha1' then
    local at = redis.call('LPOS', list, ARGV[1])
    if at then return at, ARGV[1] end
    return nil
  end
  local items = redis.call('LRANGE', list, 0, -1)
  for i = 1, #items do
    if redis.sha1hex(items[i]) == ARGV[1] then return i - 1, items[i] end
  end
  return nil
end
local function take(list)
  if ARGV[2] ~= 'sha1' then
    if redis.call('LREM', list, 1, ARGV[1]) > 0 then return ARGV[1] end
    return nil
  end
  local at, item = find(list)
  if not at then return nil end
  local mark = 'taken:' .. ARGV[1]
  redis.call('LSET', list, at, mark)
  redis.call('LREM', list, 1, mark)
  return item
end
local function ours(holder, owner)
  return holder and string.sub(holder, 1, #owner + 1) == owner .. ':'
end
"""
# KEYS processing, queue, attempts, done, claim; ARGV[3] job id, [4] owner, [5] claim TTL, [6] tail push.
_BEGIN = _ELEMENT + """
if not find(KEYS[1]) then return -3 end
if redis.call('EXISTS', KEYS[4]) == 1 then take(KEYS[1]) return -1 end
local holder = redis.call('GET', KEYS[5])
if holder and not ours(holder, ARGV[4]) then
  redis.call(ARGV[6], KEYS[2], take(KEYS[1]))
  return -2
end
local attempt = redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('SET', KEYS[5], ARGV[4] .. ':' .. attempt, 'EX', ARGV[5])
return attempt
"""
# KEYS processing, queue, attempts, done, claim, outbox, lease, dead, dead log; ARGV[3] job id, [4] claim token
# ('' for a job that never began), [5] body ('' none owed), [6] done TTL, [7] lease TTL, [8] owner, [9] dead-log
# entry ('' unless dead-lettered), [10] dead-log cap, [11] head push. Returns 2 when this very settle already ran
# (a retry after its reply was lost: the claim is gone, but the outbox holds our body under our lease).
_SETTLE = _ELEMENT + """
if ARGV[4] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[4] then
  if redis.call('HGET', KEYS[6], ARGV[3]) == ARGV[5] and redis.call('GET', KEYS[7]) == ARGV[8] then
    return 2
  end
  local item = take(KEYS[1])
  if item then redis.call(ARGV[11], KEYS[2], item) end
  return -1
end
local item = take(KEYS[1])
if item and ARGV[9] ~= '' then
  redis.call('RPUSH', KEYS[8], item)
  redis.call('LPUSH', KEYS[9], ARGV[9])
  redis.call('LTRIM', KEYS[9], 0, tonumber(ARGV[10]) - 1)
end
redis.call('HDEL', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], '1', 'EX', ARGV[6])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[6], ARGV[3], ARGV[5]) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[7], ARGV[8], 'EX', ARGV[7]) end
if ARGV[4] ~= '' then redis.call('DEL', KEYS[5]) end
if item then return 1 end
return 0
"""
# KEYS processing, queue, attempts, claim; ARGV[3] job id ('' unknown), [4] claim token ('' none), [5] '1' to
# undo the attempt, [6] owner, [7] head push.
_HAND_BACK = _ELEMENT + """
local item = take(KEYS[1])
local holder = false
if ARGV[3] ~= '' then holder = redis.call('GET', KEYS[4]) end
if item then
  redis.call(ARGV[7], KEYS[2], item)
  if ARGV[5] == '1' and ARGV[4] ~= '' and holder == ARGV[4] then redis.call('HINCRBY', KEYS[3], ARGV[3], -1) end
end
if ours(holder, ARGV[6]) then redis.call('DEL', KEYS[4]) end
if item then return 1 end
return 0
"""
# KEYS processing, dead, dead log; ARGV[3] dead-log entry, [4] dead-log cap.
_DEAD_LETTER = _ELEMENT + """
local item = take(KEYS[1])
if not item then return 0 end
redis.call('RPUSH', KEYS[2], item)
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
return 1
"""
_RENEW_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS heartbeat, processing, workers:active; ARGV[1] member.
_RETIRE = """
redis.call('DEL', KEYS[1])
if redis.call('LLEN', KEYS[2]) > 0 then return 0 end
return redis.call('SREM', KEYS[3], ARGV[1])
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

    @cached_property
    def ref(self) -> tuple[str | bytes, str]:
        """How scripts name this element: its bytes, or their SHA-1 when they are not UTF-8 text."""
        try:
            self.raw.decode("utf-8")
            return self.raw, "raw"
        except UnicodeDecodeError:
            return hashlib.sha1(self.raw).hexdigest(), "sha1"


@dataclass(frozen=True)
class Claim:
    """This worker runs ``job_id``: attempt ``attempt``, fenced by ``token`` (``<worker_id>:<attempt>``)."""

    job_id: str
    attempt: int
    token: str


class Skipped(StrEnum):
    """Why ``begin`` did not start a job (the element has left this worker's processing list)."""

    DONE = "a copy of a job that already reached its terminal state: dropped"
    BUSY = "another worker holds the job's claim: the copy went back to the tail of the queue"
    GONE = "no longer in this worker's processing list (handed back or reaped before it began)"


class Settled(StrEnum):
    """What ``settle`` did: only ``FENCED`` wrote nothing (the runner then discards the run's result)."""

    SETTLED = "settled"
    REAPED = "settled, but the element had already left the processing list (reaped while it ran)"
    FENCED = "not settled: the claim is not ours any more (nothing written)"


_BEGIN_SKIPS = {-1: Skipped.DONE, -2: Skipped.BUSY, -3: Skipped.GONE}
_SETTLE_CODES = {2: Settled.SETTLED, 1: Settled.SETTLED, 0: Settled.REAPED, -1: Settled.FENCED}


class ReliableQueue:
    def __init__(self, *, transport: Transport, queue: str, worker_id: str, side: str = "left",
                 heartbeat_ttl: int = 30, poll_min: float = 0.1, poll_max: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', not {side!r}")
        self.transport = transport
        self.queue = queue
        self.worker_id = worker_id
        self.side = side
        self.heartbeat_ttl = heartbeat_ttl
        self.claim_ttl = CLAIM_TTL_HEARTBEATS * heartbeat_ttl
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.sleep, self.clock = sleep, clock
        self.processing = keys.processing(queue, worker_id)
        self._head_push, self._tail_push = ("LPUSH", "RPUSH") if side == "left" else ("RPUSH", "LPUSH")
        self._suspects: dict[str, float] = {}   # member → when its heartbeat was first seen missing
        self._orphans: set[str] = set()          # members of processing lists outside workers:active
        self._reaps = 0
        self._idle_polls = 0
        self._unsure = False                     # a move failed: it may have moved an element anyway
        self._sure: tuple[str, float] | None = None   # (claim token, until when it surely still lives)

    # -- taking work ---------------------------------------------------------------------------
    def fetch(self, wait: float | None = None) -> Delivery | None:
        """Move the next job into the processing list; ``None`` if none arrived within about ``wait``.
        ``TransportError`` if the move failed or its reply was lost: the next call first returns whatever the
        processing list holds (a worker holds one job at most, so that is the element the move took)."""
        wait = self.poll_max if wait is None else wait
        if self._unsure:
            self.recover_own()
            self._unsure = False
        try:
            raw = self._move(wait)
        except TransportError:
            self._unsure = True
            raise
        if raw is None:
            return None
        self._idle_polls = 0
        return Delivery(raw=raw, queue=self.queue)

    def _move(self, wait: float) -> bytes | None:
        if self.transport.can_block:
            return self.transport.blocking_move(self.queue, self.processing, self.side, max(wait, 0.01))
        raw = self.transport.command("LMOVE", self.queue, self.processing, self.side.upper(), "RIGHT")
        if raw is None:
            # REST cannot block: back off from poll_min up to poll_max while idle.
            self._idle_polls += 1
            self.sleep(min(self.poll_max, self.poll_min * 2 ** min(self._idle_polls - 1, 10), wait))
        return raw

    def begin(self, delivery: Delivery, job_id: str) -> Claim | Skipped:
        """Count the attempt and take the job's claim, unless the job is done or claimed by another worker."""
        sent = self.clock()
        code = int(self._script(_BEGIN, delivery, [self.processing, self.queue, keys.attempts(self.queue),
                                                   keys.done(job_id), keys.claim(job_id)],
                                [job_id, self.worker_id, self.claim_ttl, self._tail_push]))
        if code in _BEGIN_SKIPS:
            return _BEGIN_SKIPS[code]
        claim = Claim(job_id, code, f"{self.worker_id}:{code}")
        self._sure = (claim.token, sent + CLAIM_SURE_FRACTION * self.claim_ttl)
        return claim

    def holds_claim(self, job_id: str, token: str) -> bool:
        """Whether ``token`` still holds the job's claim (it was not taken over while the job ran)."""
        sure = self._sure
        if sure is not None and sure[0] == token and self.clock() < sure[1]:
            # Taken or renewed (the clock read before the command was sent) less than its TTL ago: a live claim
            # is never taken over (``begin`` refuses it), so no round trip is needed to know it is still ours.
            return True
        held = self.transport.command("GET", keys.claim(job_id))
        return held is not None and _text(held) == token

    def renew_claim(self, job_id: str, token: str) -> bool:
        """Extend the claim by its TTL if it is still ours (the heartbeat calls this while a job runs)."""
        sent = self.clock()
        renewed = bool(self.transport.command("EVAL", _RENEW_CLAIM, 1, keys.claim(job_id), token, self.claim_ttl))
        if renewed:
            self._sure = (token, sent + CLAIM_SURE_FRACTION * self.claim_ttl)
        return renewed

    # -- leaving the processing list (each atomic) ---------------------------------------------
    def settle(self, delivery: Delivery, job_id: str, body: bytes, token: str | None, lease_seconds: float,
               dead_reason: str | None = None) -> Settled:
        """The terminal step: done marker + the owed callback ``body`` (``b""``: none, a cancelled job) in the
        outbox under this worker's lease (``lease_seconds``), and the element out of the processing list (into
        the dead list with ``dead_reason``), in one step, only while ``token`` holds the claim (``None``: a job
        that never began, e.g. invalid)."""
        entry = self._dead_entry(job_id, dead_reason) if dead_reason else ""
        code = int(self._script(_SETTLE, delivery, [
            self.processing, self.queue, keys.attempts(self.queue), keys.done(job_id), keys.claim(job_id),
            keys.OUTBOX, keys.outbox_lease(job_id), keys.dead(self.queue), keys.dead_log(self.queue)],
            [job_id, token or "", body, keys.DONE_TTL_SECONDS, max(1, math.ceil(lease_seconds)), self.worker_id,
             entry, keys.DEAD_LOG_MAX, self._head_push]))
        if dead_reason and code >= 0:
            log.warning("dead-lettered job %s of %s: %s", job_id, self.queue, dead_reason)
        return _SETTLE_CODES[code]

    def hand_back(self, delivery: Delivery, job_id: str | None = None, token: str | None = None,
                  count_attempt: bool = False) -> bool:
        """Return the job to the head of its queue and drop this worker's claim on it. The attempt stays
        counted if asked; otherwise it is undone, but only if ``token`` shows this worker counted it.
        False if the element was no longer in the processing list."""
        self._sure = None   # the claim is dropped here: from now on only Redis can say who holds it
        return bool(self._script(_HAND_BACK, delivery, [self.processing, self.queue, keys.attempts(self.queue),
                                                        keys.claim(job_id or "-")],
                                 [job_id or "", token or "", "" if count_attempt else "1", self.worker_id,
                                  self._head_push]))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """An element that is not a job (no id): to the dead list, with the reason in the dead log."""
        self._script(_DEAD_LETTER, delivery, [self.processing, keys.dead(self.queue), keys.dead_log(self.queue)],
                     [self._dead_entry(None, reason), keys.DEAD_LOG_MAX])
        log.warning("dead-lettered an element of %s: %s", self.queue, reason)

    def _dead_entry(self, job_id: str | None, reason: str) -> str:
        return json.dumps({"job_id": job_id, "reason": reason, "worker_id": self.worker_id, "at": time.time()})

    # -- liveness ------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        self.transport.command("SET", keys.heartbeat(self.worker_id), str(time.time()), "EX", self.heartbeat_ttl)
        self.transport.command("SADD", keys.ACTIVE_WORKERS, keys.active_member(self.queue, self.worker_id))

    def recover_own(self) -> int:
        """Return whatever this worker's processing list holds (after a failed move) to the head of the queue."""
        moved = self._return_all(self.processing, self.queue)
        if moved:
            log.warning("returned %d job(s) held by %s to %s", moved, self.worker_id, self.queue)
        return moved

    def reap(self) -> int:
        """Return the jobs of every worker whose heartbeat has been missing for a whole TTL (seen by this
        reaper) to the head of their queue. The second TTL of grace covers a Redis restart, after which every
        live worker's heartbeat is gone until its next beat: a running job is not handed out twice. Workers
        are found in ``workers:active`` and, every ``ORPHAN_SCAN_EVERY`` reaps, by their processing lists."""
        moved = 0
        now = self.clock()
        members = {_text(m) for m in self.transport.command("SMEMBERS", keys.ACTIVE_WORKERS) or []}
        if self._reaps % ORPHAN_SCAN_EVERY == 0:
            self._orphans = self._processing_owners() - members
        self._reaps += 1
        watched = members | self._orphans
        self._suspects = {m: t for m, t in self._suspects.items() if m in watched}
        for member in watched:
            queue, worker_id = keys.parse_active_member(member)
            if worker_id == self.worker_id or self.transport.command("EXISTS", keys.heartbeat(worker_id)):
                self._suspects.pop(member, None)
                continue
            if now - self._suspects.setdefault(member, now) < self.heartbeat_ttl:
                continue
            del self._suspects[member]
            self._orphans.discard(member)
            count = self._return_all(keys.processing(queue, worker_id), queue)
            self.transport.command("SREM", keys.ACTIVE_WORKERS, member)
            if count:
                log.warning("reaped %d job(s) of dead worker %s back to %s", count, worker_id, queue)
            moved += count
        return moved

    def _processing_owners(self) -> set[str]:
        """``<queue>|<worker_id>`` of every non-empty processing list (SCAN; empty lists do not exist)."""
        owners, cursor = set(), 0
        while True:
            cursor, found = self.transport.command("SCAN", cursor, "MATCH", keys.PROCESSING_PATTERN,
                                                   "COUNT", SCAN_COUNT)
            owners.update(keys.active_member(*keys.parse_processing(_text(k))) for k in found)
            if int(cursor) == 0:
                return owners

    def retire(self) -> None:
        """On a clean exit: drop the heartbeat, and the registry entry if (atomically) nothing is held."""
        self.transport.command("EVAL", _RETIRE, 3, keys.heartbeat(self.worker_id), self.processing,
                               keys.ACTIVE_WORKERS, keys.active_member(self.queue, self.worker_id))

    def depth(self) -> int:
        return int(self.transport.command("LLEN", self.queue))

    def _return_all(self, processing: str, queue: str) -> int:
        return int(self.transport.command("EVAL", _RETURN_ALL, 2, processing, queue, self.side))

    def _script(self, script: str, delivery: Delivery, script_keys: list[str], args: list) -> int:
        return self.transport.command("EVAL", script, len(script_keys), *script_keys, *delivery.ref, *args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

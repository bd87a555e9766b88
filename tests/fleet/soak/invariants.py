"""What must hold once the soak's fleet has settled, and the evidence of every violation.

Per job (the callbacks the stand-in recorded): exactly one terminal callback. None is a lost job. Several
are split by their bytes. Different bytes are a second *run* of the job (the fake handler puts a fresh ``run``
token and its pid in every completed callback): a duplicate. The same bytes again are judged by the front's
record of each POST (:class:`~tests.fleet.faults.Exchange`): sent again after an earlier copy had been answered
2xx within the caller's timeout to a sender that then lived long enough to record it (not killed, cold-stopped
or drained within ``RECORD_SECONDS`` of the answer), it is a duplicate delivery (e.g. several outbox senders);
otherwise no sender knew of the delivery: an at-least-once re-delivery, reported apart and not a failure.
A completed job's assets must all be in storage (the count it asked for, each object with the size the
callback states); a job told to fail must never be reported completed.

In Redis: no job left in a queue or a processing list, no outbox entry, and every dead-list element belongs
to a job whose one terminal callback is ``failed``. Attempt counters and claims left behind are reported
(informational: they expire or are harmless, but they show a terminal step that did not clean up).
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common import keys
from local.supabase_standin import ReceivedCallback, SupabaseStandin

from ..faults import Exchange
from ..jobs import QUEUES, TERMINAL
from .injector import Event
from .producer import SoakJob

BUCKET = "workspace-temp"
SLOW_SECONDS = 30.0   # a job this long from push to terminal callback sat somewhere (reported, not a failure)
LOG_LINES_PER_JOB = 14
RECORD_SECONDS = 2.0  # how long a sender that got its 2xx may take to record the delivery in Redis
JOB_ID = re.compile(r"soak-[a-z]+-\d{5}-[0-9a-f]{8}")  # producer.py's job ids


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None          # None: informational
    summary: str


@dataclass
class Violation:
    kind: str
    job_id: str
    summary: str
    evidence: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    checks: list[Check]
    violations: list[Violation]
    outcomes: Counter        # (behaviour, outcome) → jobs
    redelivered_jobs: int
    redelivered_posts: int
    slow: list[Violation] = field(default_factory=list)   # informational: jobs slower than SLOW_SECONDS

    @property
    def failed(self) -> bool:
        return any(c.ok is False for c in self.checks)


def job_id_of(element: bytes) -> str | None:
    """The job id inside a queue element of any of the three forms (None if it has none)."""
    try:
        value = json.loads(element)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str):
            value = json.loads(value)
        return value.get("id") if isinstance(value, dict) else None
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


@dataclass
class RedisState:
    waiting: dict[str, list[str]]                  # queue → job ids
    processing: dict[str, list[str]]               # processing key → job ids
    outbox: dict[str, bytes]
    dead: dict[str, list[str | None]]              # queue → job ids
    attempts: dict[str, dict[str, int]]            # queue → job id → count
    claims: dict[str, str]
    heartbeats: set[str]
    active: set[str]

    @classmethod
    def read(cls, client: redis.Redis) -> RedisState:
        text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        processing = {text(k): [job_id_of(e) or "?" for e in client.lrange(k, 0, -1)]
                      for k in client.scan_iter(match="*:processing:*", count=1000)}
        return cls(
            waiting={q: [job_id_of(e) or "?" for e in client.lrange(q, 0, -1)] for q in QUEUES},
            processing={k: v for k, v in processing.items() if v},
            outbox={text(k): v for k, v in client.hgetall(keys.OUTBOX).items()},
            dead={q: [job_id_of(e) for e in client.lrange(keys.dead(q), 0, -1)] for q in QUEUES},
            attempts={q: {text(k): int(v) for k, v in client.hgetall(keys.attempts(q)).items()} for q in QUEUES},
            claims={text(k): text(client.get(k) or b"") for k in client.scan_iter(match="job:*:claim", count=1000)},
            heartbeats={text(k) for k in client.scan_iter(match="worker:*:heartbeat", count=1000)},
            active={text(m) for m in client.smembers(keys.ACTIVE_WORKERS)},
        )

    def where(self, job_id: str) -> list[str]:
        """Every place in Redis that still mentions the job."""
        found = [f"waiting in {q}" for q, ids in self.waiting.items() if job_id in ids]
        for key, ids in self.processing.items():
            if job_id in ids:
                owner = key.split(":processing:", 1)[1]
                alive = keys.heartbeat(owner) in self.heartbeats
                member = keys.active_member(key.split(":processing:", 1)[0], owner) in self.active
                found.append(f"in {key} (owner heartbeat {'alive' if alive else 'gone'}, "
                             f"{'still' if member else 'not'} in workers:active)")
        if job_id in self.outbox:
            found.append(f"outbox entry: {self.outbox[job_id][:160]!r}")
        found += [f"in {q}:dead" for q, ids in self.dead.items() if job_id in ids]
        found += [f"{q}:attempts = {a[job_id]}" for q, a in self.attempts.items() if job_id in a]
        if keys.claim(job_id) in self.claims:
            found.append(f"claim {self.claims[keys.claim(job_id)]}")
        return found or ["nothing left in Redis"]


class Checker:
    def __init__(self, jobs: dict[str, SoakJob], standin: SupabaseStandin, client: redis.Redis,
                 events: list[Event], log_files: Iterable[Path], epoch: float, run_end: float,
                 exchanges: Iterable[Exchange] = (), client_timeout: float = 2.0):
        self.jobs = jobs
        self.exchanges: dict[bytes, list[Exchange]] = defaultdict(list)
        for exchange in sorted(exchanges, key=lambda e: e.arrived):
            self.exchanges[exchange.body].append(exchange)
        self.client_timeout = client_timeout
        self.deaths = _deaths(events, epoch)
        self.objects = standin.objects
        self.callbacks: dict[str, list[ReceivedCallback]] = defaultdict(list)
        for cb in standin.callbacks():
            self.callbacks[cb.job_id].append(cb)
        self.state = RedisState.read(client)
        self.events = events
        self.log_files = list(log_files)
        self.epoch = epoch
        self.run_end = run_end

    # ------------------------------------------------------------------ the verdict
    def verdict(self) -> Verdict:
        violations: list[Violation] = []
        outcomes: Counter = Counter()
        redelivered_jobs = redelivered_posts = 0
        latencies: list[float] = []
        slow: list[Violation] = []
        for job in self.jobs.values():
            terminal = self.terminal(job.id)
            distinct = list(dict.fromkeys(c.raw for c in terminal))
            if not terminal:
                violations.append(Violation("lost", job.id, "no terminal callback"))
                outcomes[(job.behaviour, "none")] += 1
                continue
            first = terminal[0].body
            took = terminal[0].at - self.epoch - job.pushed_at
            latencies.append(took)
            if took > SLOW_SECONDS:
                slow.append(Violation("slow", job.id, f"{took:.0f} s from push to its terminal callback"))
            outcomes[(job.behaviour, first["status"] if first["status"] == "completed"
                      else f"failed {first['metadata'].get('error_type')}")] += 1
            benign, after_ack = self.resent(distinct, len(terminal))
            if benign:
                redelivered_jobs += 1
                redelivered_posts += benign
            if after_ack:
                violations.append(Violation("sent again after ack", job.id, f"{after_ack} more POSTs of a terminal "
                                                                            f"callback already acknowledged"))
            if len(distinct) > 1:
                statuses = "/".join(json.loads(raw)["status"] for raw in distinct)
                violations.append(Violation("run twice", job.id, f"{len(distinct)} different terminal callbacks "
                                                                 f"({statuses})"))
            if job.must_not_complete and any(c.status == "completed" for c in terminal):
                violations.append(Violation("false success", job.id, f"told to {job.behaviour}, reported completed"))
            for raw in distinct:
                body = json.loads(raw)
                if body["status"] == "completed":
                    missing = self.missing_assets(job, body)
                    if missing:
                        violations.append(Violation("files missing", job.id, "; ".join(missing)))
        violations += self.redis_violations()
        logs = self.log_index({v.job_id for v in violations + slow})
        for violation in violations + slow:
            violation.evidence = self.evidence(violation.job_id) + [f"log: {line}" for line in logs[violation.job_id]]
        kinds = Counter(v.kind for v in violations)

        def check(name: str, *bad: str) -> Check:
            n = sum(kinds[b] for b in bad)
            return Check(name, n == 0, "ok" if n == 0 else ", ".join(f"{kinds[b]} {b}" for b in bad if kinds[b]))
        stale_attempts = sum(1 for a in self.state.attempts.values() for j in a if self.terminal(j))
        checks = [
            check("every job exactly one terminal callback", "lost", "run twice", "sent again after ack"),
            check("completed jobs' files all in storage", "files missing"),
            check("no success reported for a job told to fail", "false success"),
            check("queues empty", "left waiting"),
            check("processing lists empty", "stranded in processing"),
            check("outbox empty", "stranded in outbox"),
            check("dead lists hold only failed jobs", "dead but not failed"),
            Check("identical re-deliveries (at-least-once)", None,
                  f"{redelivered_jobs} jobs, {redelivered_posts} extra POSTs"),
            Check("attempt counters left for finished jobs", None, str(stale_attempts)),
            Check("claims left", None, str(len(self.state.claims))),
            Check("push → first terminal callback", None, _spread(latencies)
                  + f"; {len(slow)} jobs over {SLOW_SECONDS:g} s"),
        ]
        return Verdict(checks, violations, outcomes, redelivered_jobs, redelivered_posts, slow)

    def resent(self, bodies: list[bytes], received: int) -> tuple[int, int]:
        """(re-sent copies no sender knew were delivered, copies sent after one was acknowledged). Without the
        front's record (no exchanges), every extra copy counts as a re-delivery."""
        benign = after_ack = 0
        for body in bodies:
            posts = self.exchanges.get(body, [])
            for k, post in enumerate(posts[1:], start=1):
                if any(p.acknowledged(self.client_timeout) and p.answered <= post.arrived and not self.sender_died(p)
                       for p in posts[:k]):
                    after_ack += 1
                else:
                    benign += 1
        if not self.exchanges:
            benign = received - len(bodies)
        return benign, after_ack

    def sender_died(self, post: Exchange) -> bool:
        """Whether the process that sent ``post`` was ended before it could have recorded the answer: known by
        its pid; without one (not found at the time), by the worker id the body names."""
        try:
            named = str(json.loads(post.body).get("worker_id"))
        except (ValueError, AttributeError):
            named = ""
        for start, end, prefix, pids in self.deaths:
            if start <= post.answered + RECORD_SECONDS and end >= post.arrived:
                if post.sender_pid in pids if post.sender_pid is not None else named.startswith(prefix):
                    return True
        return False

    def terminal(self, job_id: str) -> list[ReceivedCallback]:
        return [c for c in self.callbacks.get(job_id, []) if c.status in TERMINAL]

    def missing_assets(self, job: SoakJob, body: dict) -> list[str]:
        assets = body.get("assets") or []
        problems = [] if len(assets) == job.images else [f"{len(assets)} assets for {job.images} images"]
        for asset in assets:
            for path, size in ((asset.get("url"), asset.get("metadata", {}).get("file_size_bytes")),
                               (asset.get("thumbnail_url"), None)):
                if path is None:
                    continue
                stored = self.objects.get(f"{BUCKET}/{path}")
                if stored is None:
                    problems.append(f"{path} not in storage")
                elif size is not None and len(stored[0]) != size:
                    problems.append(f"{path} holds {len(stored[0])} bytes, the callback says {size}")
        return problems

    def redis_violations(self) -> list[Violation]:
        found = []
        for queue, ids in self.state.waiting.items():
            found += [Violation("left waiting", j, f"still waiting in {queue}") for j in ids]
        for key, ids in self.state.processing.items():
            found += [Violation("stranded in processing", j, f"still in {key}") for j in ids]
        found += [Violation("stranded in outbox", j, "terminal callback still in the outbox")
                  for j in self.state.outbox]
        for queue, ids in self.state.dead.items():
            for job_id in ids:
                statuses = [c.status for c in self.terminal(job_id or "")]
                if job_id is None or job_id not in self.jobs or statuses[:1] != ["failed"]:
                    found.append(Violation("dead but not failed", job_id or "?",
                                           f"in {queue}:dead with terminal callbacks {statuses}"))
        return found

    # ------------------------------------------------------------------ evidence
    def evidence(self, job_id: str) -> list[str]:
        job = self.jobs.get(job_id)
        lines = []
        if job is not None:
            lines.append(f"job {job.type}, behaviour {job.behaviour}, pushed over {job.via} at {job.pushed_at:.1f} s"
                         + (f", pushed {job.pushes} times (re-push fault)" if job.pushes > 1 else ""))
        raws: dict[bytes, int] = {}
        for cb in self.callbacks.get(job_id, []):
            meta = cb.body.get("metadata") or {}
            copy = ""
            if cb.status in TERMINAL:
                copy = f" body #{raws.setdefault(cb.raw, len(raws) + 1)}"
            lines.append(f"callback at {cb.at - self.epoch:.1f} s: {cb.status}{copy} by {cb.body.get('worker_id')}"
                         + "".join(f" {k}={meta[k]}" for k in ("attempt", "pid", "run", "error_type") if k in meta))
        for raw, number in raws.items():
            posts = self.exchanges.get(raw, [])
            if posts:
                lines.append(f"body #{number} POSTed {len(posts)}x: " + ", ".join(
                    f"at {p.arrived - self.epoch:.1f} s answered {p.status} after {p.answered - p.arrived:.1f} s"
                    for p in posts[:6]))
        lines += [f"redis: {where}" for where in self.state.where(job_id)]
        if job is not None:
            last = max([cb.at - self.epoch for cb in self.callbacks.get(job_id, [])] or [self.run_end])
            lines += [f"fault at {e.at:.1f} s: {e.kind}: {e.detail}" for e in self.events
                      if job.pushed_at - 3 <= e.at <= last + 3][:12]
        return lines

    def log_index(self, job_ids: set[str]) -> dict[str, list[str]]:
        """The first log lines of every pod (rotated files oldest first) that name each of ``job_ids``:
        one pass over the logs, however many jobs are asked for."""
        found: dict[str, list[str]] = defaultdict(list)
        def oldest_first(path: Path) -> tuple:   # orchestrator.log.2 is older than .1, which is older than .log
            return path.parent, -int(path.suffix[1:]) if path.suffix[1:].isdigit() else 0
        for path in sorted(self.log_files, key=oldest_first):
            try:
                with open(path, errors="replace") as f:
                    for line in f:
                        for job_id in set(JOB_ID.findall(line)) & job_ids:
                            if len(found[job_id]) < LOG_LINES_PER_JOB:
                                found[job_id].append(line.rstrip()[:400])
            except OSError:
                continue
        return found


def _deaths(events: Iterable[Event], epoch: float) -> list[tuple[float, float, str, frozenset[int]]]:
    """(from, to, worker-id prefix, pids) in ``time.time()`` seconds: when injected faults ended which processes.
    A kill or cold stop is an instant; a pod drain lasts from its SIGTERM until its orchestrator is gone."""
    found, leaving = [], {}
    for event in events:
        if not (event.done and event.target):
            continue
        if event.kind == "pod_toggle":
            leaving[event.target] = event
        elif event.kind == "pod_left":
            began = leaving.pop(event.target, event).at
            found.append((epoch + began, epoch + event.at, event.target, frozenset(event.pids)))
        else:
            found.append((epoch + event.at, epoch + event.at, event.target, frozenset(event.pids)))
    found += [(epoch + e.at, float("inf"), e.target, frozenset(e.pids)) for e in leaving.values()]  # still draining
    return found


def _spread(values: list[float]) -> str:
    if not values:
        return "no terminal callbacks"
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.5):.1f} s, p99 {pick(0.99):.1f} s, max {ordered[-1]:.1f} s"

"""The randomised fault soak (issue 14 §3): the whole fleet under ``python -m orchestrator`` (fake handler in the
real worker processes; real redis-server with an fsynced AOF; the Supabase stand-in behind SupabaseFront), a
seeded stream of jobs of all three families over both transports, a seeded schedule of faults, then the
invariant checker (tests/fleet/soak/invariants.py).

Injects, at random times: SIGKILL of a worker (its gunicorn worker process or its whole group), SIGINT to a
worker's group (the cold stop), SIGSTOP/SIGCONT of redis-server for longer than the clients' timeout, a Redis
SIGKILL + restart on the same AOF, replies to the Redis-protocol workers held past their timeout, job-callback
503 windows, hangs (never answered) and late answers (recorded, answer lost), half of them with the cold stop
of a worker busy in the outage, storage 500 windows, a second pod (own RUNPOD_POD_ID, same Redis and
Supabase) joining and leaving (SIGTERM: a pod drain), a producer re-push; all the time, the workers' Upstash
REST front drops requests, loses replies after running them and holds replies past the client timeout.

Asserts, after a settle period (reaper grace, outbox interval): every job exactly one terminal callback
(identical re-deliveries counted apart), completed jobs' files in storage, nothing left in queues, processing
lists or the outbox, dead lists holding only failed jobs. ``SOAK_MINUTES`` (1.5 here; ``make soak``: 30) and
``SOAK_SEED`` (random unless given; printed) steer it; the table and every violation's evidence are printed and
written to ``var/soak/<time>-seed<seed>/report.txt`` next to the fleet's logs.
"""
from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from local.redis_server import RedisServer
from local.supabase_standin import SupabaseStandin
from local.upstash_front import UpstashFront

from .conftest import CALLBACK_SECRET, SERVICE_KEY, shared_memory_dir
from .faults import ReplyDelayProxy, SupabaseFront
from .jobs import QUEUES, TERMINAL
from .soak import plan, report
from .soak.injector import Injector
from .soak.invariants import Checker, RedisState
from .soak.pods import SOAK_FLEET_ENV, Pod
from .soak.producer import Producer

CONFIG = plan.SoakConfig.from_env(os.environ)
REST_TOKEN = "soak-upstash-token"
SETTLE_TIMEOUT_SECONDS = 120.0   # long enough for 2 heartbeat TTLs of reaper grace, retries and the outbox
QUIET_SECONDS = 20.0             # then this long with nothing owed: late duplicates have time to show


class Rig:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.redis = RedisServer(persistence=True, data_dir=shared_memory_dir())
        self.client = self.redis.client()
        self.redis_proxy = ReplyDelayProxy(self.redis.port)
        self.standin = SupabaseStandin(SERVICE_KEY, CALLBACK_SECRET)
        self.front = SupabaseFront(self.standin.url, identify_senders=True)
        self.worker_rest = UpstashFront(self.redis.url, REST_TOKEN, fault_seed=CONFIG.rng("rest").getrandbits(32))
        self.producer_rest = UpstashFront(self.redis.url, REST_TOKEN)
        self.pods: list[Pod] = []

    def pod(self, name: str, role: str) -> Pod:
        return Pod(name, role, self.out_dir / name, self.redis, self.front, self.redis_proxy.url,
                   self.worker_rest.url, REST_TOKEN)

    def close(self) -> list[int]:
        leftovers = [pid for pod in self.pods for pid in pod.close()]
        for server in (self.worker_rest, self.producer_rest, self.front, self.standin, self.redis_proxy):
            server.stop()
        self.client.close()
        data_dir = self.redis.data_dir
        self.redis.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        return leftovers


@pytest.fixture
def soak_rig() -> Iterator[Rig]:
    out_dir = CONFIG.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{CONFIG.seed}"
    rig = Rig(out_dir)
    yield rig
    leftovers = rig.close()
    assert not leftovers, f"processes outlived their orchestrator: {leftovers}"


def settle(rig: Rig, producer: Producer, emit: Callable[[str], None]) -> None:
    """Wait until every job has a terminal callback and nothing is owed in Redis (or the timeout), then a
    quiet period."""
    started = time.monotonic()

    def owed() -> bool:
        done = {c.job_id for c in rig.standin.callbacks() if c.status in TERMINAL}
        if not done.issuperset(producer.jobs):
            return True
        state = RedisState.read(rig.client)
        return any(state.waiting.values()) or bool(state.processing) or bool(state.outbox)
    while owed() and time.monotonic() - started < SETTLE_TIMEOUT_SECONDS:
        time.sleep(1.0)
    emit(f"settled after {time.monotonic() - started:.0f} s; quiet for {QUIET_SECONDS:g} s")
    time.sleep(QUIET_SECONDS)


@pytest.mark.timeout(int(CONFIG.seconds + 900))
def test_soak_under_random_faults_every_job_reaches_exactly_one_terminal_state(soak_rig, capsys):
    rig = soak_rig

    def emit(text: str) -> None:
        with capsys.disabled():
            sys.stdout.write(f"\n[soak] {text}\n")
            sys.stdout.flush()

    emit(f"seed {CONFIG.seed} ({'given' if CONFIG.seed_was_given else 'random'}), {CONFIG.minutes:g} min; "
         f"fleet logs and the report in {rig.out_dir}")
    faults = plan.schedule(CONFIG, redis_client_timeout=1.5)
    pod_a = rig.pod("soak-a", "a")
    rig.pods.append(pod_a)
    pod_a.start()
    epoch, began = time.time(), time.monotonic()
    clock = lambda: time.monotonic() - began  # noqa: E731 (run seconds)
    redis_lock = threading.Lock()
    producer = Producer(rig.client, rig.producer_rest.url, REST_TOKEN, CONFIG.rng("jobs"), CONFIG.jobs_per_second,
                        clock, redis_lock)

    def new_pod_b(n: int) -> Pod:
        pod = rig.pod(f"soak-b{n}", "b")
        rig.pods.append(pod)
        return pod
    injector = Injector(rig.redis, rig.redis_proxy, rig.standin, rig.front, producer, pod_a, new_pod_b, clock,
                        redis_lock, CONFIG.rng("injector"))
    rate = CONFIG.rest_fault_rate
    rig.worker_rest.faults.set(drop=rate, lose=rate, hold=rate, hold_seconds=2.5)
    stop = threading.Event()
    threads = [threading.Thread(target=producer.run, args=(stop, CONFIG.seconds), name="soak-producer", daemon=True),
               threading.Thread(target=injector.run, args=(faults, stop), name="soak-injector", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while clock() < CONFIG.seconds:
            time.sleep(min(30.0, max(0.1, CONFIG.seconds - clock())))
            emit(f"{clock():.0f} s: {len(producer.jobs)} jobs pushed, {len(injector.events)} fault events")
    finally:
        stop.set()
        rig.out_dir.mkdir(parents=True, exist_ok=True)
        stacks = open(rig.out_dir / "stuck-threads.txt", "w")
        faulthandler.dump_traceback_later(45, file=stacks)
        for thread in threads:
            thread.join(60)
            if thread.is_alive():
                emit(f"{clock():.0f} s: {thread.name} did not stop within 60 s")
        injector.finish()
        faulthandler.cancel_dump_traceback_later()
        stacks.close()
        if not (rig.out_dir / "stuck-threads.txt").stat().st_size:
            (rig.out_dir / "stuck-threads.txt").unlink()
        rig.worker_rest.faults.off()
    run_end = clock()
    emit(f"{run_end:.0f} s: faults over, settling")
    settle(rig, producer, emit)

    programs = {pod.name: pod.programs() for pod in rig.pods if pod.up}
    checker = Checker(producer.jobs, rig.standin, rig.client, injector.events, injector.log_files(), epoch, run_end,
                      rig.front.exchanges, float(SOAK_FLEET_ENV["CALLBACK_TIMEOUT_SECONDS"]))
    verdict = checker.verdict()
    rest_faults = rig.worker_rest.faults.snapshot()
    full = report.render(CONFIG, producer.jobs, injector, rest_faults, verdict, programs, rig.out_dir, True)
    report.write(rig.out_dir, full, verdict, CONFIG)
    emit(report.render(CONFIG, producer.jobs, injector, rest_faults, verdict, programs, rig.out_dir))
    assert set(QUEUES) == {j.queue for j in producer.jobs.values()}, "every family must have had jobs"
    assert injector.counts(), "no fault was injected"
    failed = [f"{c.name}: {c.summary}" for c in verdict.checks if c.ok is False]
    assert not failed, (f"soak seed {CONFIG.seed}: invariants violated: {'; '.join(failed)} "
                        f"(evidence in {rig.out_dir / 'report.txt'})")

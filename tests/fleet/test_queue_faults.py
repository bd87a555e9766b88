"""Faults around the job queue, on the whole fleet under the orchestrator (real Redis with an fsynced AOF, the
real worker processes with the fast fake handler, Supabase Storage and job-callback on the stand-in).

Every test ends with the state of every job it pushed (exactly one terminal callback of the expected kind),
the queues and processing lists (empty) and the outbox (empty)."""
from __future__ import annotations

import json
import time

import pytest

from common import keys

from .faults import Mode
from .fleet import wait_for
from .jobs import (
    COMPLETED,
    QUEUES,
    assert_drained,
    assert_exactly_once,
    dead_ids,
    fake_element,
    held,
    new_id,
    terminal,
    wait_terminal,
)

WORKERS = {"sdxl": "sdxl_queue", "chat": "chat_queue", "wan": "wan_queue"}


@pytest.mark.timeout(180)
def test_sigkill_of_each_worker_mid_job_restarts_it_and_its_job_completes_once(fake_fleet, report):
    """Injects: SIGKILL to the whole process group (gunicorn master + worker) of the sdxl, chat and wan
    workers, each while it runs a 3 s job. Asserts: the orchestrator restarts each program (new pid, one more
    restart); each in-flight job completes exactly once, run by the new process (the fake handler reports its
    pid); queues, processing lists and outbox end empty."""
    rig = fake_fleet
    jobs = {kind: new_id(f"killed-{kind}") for kind in WORKERS}
    before = rig.fleet.programs()
    for kind, queue in WORKERS.items():
        rig.client.rpush(queue, fake_element(jobs[kind], queue, sleep=3))
    for job_id in jobs.values():
        rig.standin.wait_for(job_id, status="processing", timeout=20)
    started = time.monotonic()
    killed = {kind: rig.fleet.crash(kind) for kind in WORKERS}
    assert all(len(pids) == 2 for pids in killed.values()), killed  # gunicorn master + its worker process
    for kind in WORKERS:
        after = rig.fleet.wait_restarted(kind, before[kind]["pid"], timeout=60)
        assert after["restarts"] == before[kind]["restarts"] + 1
    wait_terminal(rig.standin, jobs.values(), timeout=60)
    elapsed = time.monotonic() - started
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {job_id: COMPLETED for job_id in jobs.values()})
    for kind, job_id in jobs.items():
        ran_in = terminal(rig.standin, job_id)[0].body["metadata"]["pid"]
        assert ran_in not in killed[kind]
    report("SIGKILL of each worker", f"3 workers restarted, 3 in-flight jobs completed once {elapsed:.1f} s after "
           f"the kills", worker_kill_recovery_s=round(elapsed, 2))


@pytest.mark.timeout(180)
def test_redis_killed_and_restarted_mid_run_every_job_completes_once(fake_fleet, report):
    """Injects: SIGKILL of redis-server (append-only file, fsync always) while 30 jobs across the three queues
    run or wait, 4 s of outage (longer than the fake fleet's 2 s heartbeat TTL), then a restart on the same
    port. Asserts: the workers reconnect; every job completes exactly once; queues, processing lists, outbox
    end empty."""
    rig = fake_fleet
    jobs = {new_id(f"redis-{q.split('_')[0]}-{n}"): q for q in QUEUES for n in range(10)}
    for job_id, queue in jobs.items():
        rig.client.rpush(queue, fake_element(job_id, queue, sleep=0.4))
    wait_for(lambda: len([j for j in jobs if terminal(rig.standin, j)]) >= 3, 30, "the first completions")
    in_flight = held(rig.client)
    rig.redis.kill()
    done_at_kill = sum(1 for j in jobs if terminal(rig.standin, j))
    time.sleep(4)
    rig.redis.start()
    rig.client.connection_pool.disconnect()
    started = time.monotonic()
    wait_terminal(rig.standin, jobs, timeout=90)
    elapsed = time.monotonic() - started
    assert in_flight, "no job was running when Redis was killed"
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {job_id: COMPLETED for job_id in jobs})
    report("Redis SIGKILL + restart", f"{len(in_flight)} jobs running and {len(jobs) - done_at_kill} unfinished at "
           f"the kill; all {len(jobs)} completed once, {elapsed:.1f} s after the restart",
           redis_recovery_s=round(elapsed, 2))


@pytest.mark.timeout(180)
def test_storage_errors_are_retried_then_dead_lettered_with_storage_error(fake_fleet, report):
    """Injects: Supabase Storage answering 500: first twice (the upload's own retries absorb it), then for
    every try of every attempt of a second job. Asserts: the first job completes once with its objects stored;
    the second fails exactly once with STORAGE_ERROR and sits in sdxl_queue:dead; a third job after the
    outage completes (the worker goes on); queues, processing lists and outbox end empty."""
    rig = fake_fleet
    transient, persistent, after = new_id("storage-transient"), new_id("storage-dead"), new_id("storage-after")
    rig.standin.fail_storage_next(2, status=500)
    rig.client.rpush("sdxl_queue", fake_element(transient, "sdxl_queue"))
    wait_terminal(rig.standin, [transient], timeout=30)
    assert f"workspace-temp/fleet-user/{transient}/0.png" in rig.standin.objects
    attempts = int(rig.fleet.env.get("JOB_MAX_ATTEMPTS", "3"))
    rig.standin.fail_storage_next(4 * attempts, status=500)  # 4 tries per upload, for every attempt
    started = time.monotonic()
    rig.client.rpush("sdxl_queue", fake_element(persistent, "sdxl_queue"))
    wait_terminal(rig.standin, [persistent], timeout=120)
    elapsed = time.monotonic() - started
    rig.client.rpush("sdxl_queue", fake_element(after, "sdxl_queue"))
    wait_terminal(rig.standin, [after], timeout=30)
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {transient: COMPLETED, persistent: "STORAGE_ERROR", after: COMPLETED})
    assert len(rig.standin.callbacks(persistent, "processing")) == attempts
    assert persistent in dead_ids(rig.client, "sdxl_queue")
    assert not any(key.startswith(f"workspace-temp/fleet-user/{persistent}/") for key in rig.standin.objects)
    report("Storage 500s", f"persistent failure dead-lettered after {attempts} attempts in {elapsed:.1f} s")


@pytest.mark.timeout(180)
def test_poison_message_is_dead_lettered_after_the_attempt_limit(fake_fleet):
    """Injects: on wan_queue, a job that kills its worker process every time it runs (os._exit mid-job; gunicorn
    respawns the process, which takes back its own job), and an element that is not JSON at all. Asserts: the
    garbage goes to wan_queue:dead with no callback; the poison job is dead-lettered after the attempt limit
    with exactly one failed callback (INTERNAL_ERROR); the job behind it completes; the wan program itself
    never went down (same gunicorn master); queues, processing lists and outbox end empty."""
    rig = fake_fleet
    wan_before = rig.fleet.programs()["wan"]
    poison, behind = new_id("poison"), new_id("behind-poison")
    poison_element = fake_element(poison, "wan_queue", crash="exit")
    rig.client.rpush("wan_queue", b"{this is not json", poison_element, fake_element(behind, "wan_queue"))
    wait_terminal(rig.standin, [poison, behind], timeout=120)
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {poison: "INTERNAL_ERROR", behind: COMPLETED})
    dead = rig.client.lrange("wan_queue:dead", 0, -1)
    assert b"{this is not json" in dead and poison_element.encode() in dead
    attempts = int(rig.fleet.env.get("JOB_MAX_ATTEMPTS", "3"))
    log = [json.loads(e) for e in rig.client.lrange("wan_queue:dead:log", 0, -1)]
    assert any(e["job_id"] == poison and e["reason"] == f"attempt limit ({attempts}) reached" for e in log)
    assert any(e["job_id"] is None and e["reason"].startswith("undecodable") for e in log)
    wan_after = rig.fleet.programs()["wan"]  # gunicorn respawned its worker process; the program kept running
    assert (wan_after["state"], wan_after["pid"], wan_after["restarts"]) == ("RUNNING", wan_before["pid"],
                                                                          wan_before["restarts"])


@pytest.mark.timeout(360)
def test_callback_endpoint_503_then_hanging(fake_fleet, report):
    """Injects: the job-callback endpoint answers 503 for 6 s, then accepts connections and never answers
    for 9 s, while one job per queue runs and one more waits on each (CALLBACK_RETRY_SECONDS keeps its
    default, 240). The delivery's backoff (the fake fleet's 0.5, 1, 2, 4 s, each plus up to 0.5 s of jitter)
    puts tries into both windows: the first three are refused, the fifth (8 to 10 s in) is held until the
    workers' 3 s read timeout fires, and the sixth, 8 s later, finds the endpoint back; a longer outage would
    only add waiting.
    Asserts: during the outage each finished job is settled durably (out of its processing list, its callback
    in the outbox under its own worker's lease, so no outbox sender sends it meanwhile) while its worker keeps
    delivering it, and the next jobs wait in their queues; afterwards every job completes exactly once;
    queues, processing lists and outbox end empty."""
    rig = fake_fleet
    first = {q: new_id(f"cb-first-{q.split('_')[0]}") for q in QUEUES}
    second = {q: new_id(f"cb-second-{q.split('_')[0]}") for q in QUEUES}
    rig.front.set_mode(Mode.REFUSE)
    started = time.monotonic()
    try:
        for queue in QUEUES:
            rig.client.rpush(queue, fake_element(first[queue], queue), fake_element(second[queue], queue))
        for mode, until in ((Mode.REFUSE, 6.0), (Mode.HANG, 15.0)):
            rig.front.set_mode(mode)
            while time.monotonic() - started < until:
                time.sleep(2)
                if time.monotonic() - started < 4:   # the first jobs have run and settled by then
                    continue
                assert held(rig.client) == {}
                assert all(rig.client.llen(q) == 1 for q in QUEUES)
                assert sorted(rig.client.hkeys(keys.OUTBOX)) == sorted(j.encode() for j in first.values())
                assert all(rig.client.exists(keys.outbox_lease(j)) for j in first.values())
                assert not any(terminal(rig.standin, j) for j in [*first.values(), *second.values()])
    finally:
        rig.front.set_mode(Mode.PASS)
    outage = time.monotonic() - started
    wait_terminal(rig.standin, [*first.values(), *second.values()], timeout=90)
    delivered_after = time.monotonic() - started - outage
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {j: COMPLETED for j in [*first.values(), *second.values()]})
    assert rig.front.refused > 0 and rig.front.hung > 0
    report("job-callback outage", f"{outage:.0f} s of 503/hang ({rig.front.refused} refused, {rig.front.hung} held);"
           f" all 6 jobs completed once {delivered_after:.1f} s after it ended",
           callback_outage_s=round(outage, 1), callback_catch_up_s=round(delivered_after, 1))

"""SIGKILL of the orchestrator itself: its children must not be orphaned, and the job in flight is not lost."""
from __future__ import annotations

import json
import signal
import time

import pytest

from .fleet import Fleet, wait_for
from .jobs import COMPLETED, assert_drained, assert_exactly_once, fake_element, held, new_id, wait_terminal


@pytest.mark.timeout(180)
def test_sigkill_of_the_orchestrator_leaves_no_process_and_no_lost_job(lone_fake_fleet, report):
    """Injects: SIGKILL of ``python -m orchestrator`` while the sdxl worker runs a 5 s job. Asserts: every
    process of the fleet (memory manager, router, each gunicorn master and worker process: the whole tree
    seen before the kill) exits by itself (PR_SET_PDEATHSIG → warm stop, whose 1 s grace is too short for
    the job, so it is handed back); the job
    is back at the head of sdxl_queue, no processing list holds anything, no terminal callback was sent.
    Then a new orchestrator on the same ports (nothing left holds them) runs the job: it completes exactly
    once; queues, processing lists and outbox end empty."""
    rig = lone_fake_fleet
    job = new_id("orphan-check")
    rig.client.rpush("sdxl_queue", fake_element(job, "sdxl_queue", sleep=5))
    rig.standin.wait_for(job, status="processing", timeout=20)
    tree = {p.pid: p.name() for p in rig.fleet.tree()}
    assert len(tree) >= 11, tree  # orchestrator + memory manager, router, 3 workers: each a master + a worker
    rig.fleet.proc.send_signal(signal.SIGKILL)
    rig.fleet.proc.wait(10)
    killed_at = time.monotonic()
    wait_for(lambda: not rig.fleet.survivors(), 40,
             f"every process of the fleet to exit (left: {[p.pid for p in rig.fleet.survivors()]})", interval=0.2)
    gone_after = time.monotonic() - killed_at
    assert [json.loads(json.loads(e)[0])["id"] for e in rig.client.lrange("sdxl_queue", 0, -1)] == [job]
    assert held(rig.client) == {}
    assert [c.status for c in rig.standin.callbacks(job)] == ["processing"]

    revived = Fleet(rig.fleet.env, rig.fleet.log_path)
    rig.fleet = revived  # the fixture stops this one
    revived.start(timeout=60)
    wait_terminal(rig.standin, [job], timeout=90)
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {job: COMPLETED})
    report("SIGKILL of the orchestrator", f"{len(tree) - 1} child processes all gone {gone_after:.1f} s later; "
           "the running job was handed back and completed once by a new fleet", orphan_exit_s=round(gone_after, 2))

"""The soak's invariant checker sees each kind of violation (and only those): real redis-server, real signed
callbacks and uploads over HTTP to the Supabase stand-in, a real log file. Fast: no fleet."""
from __future__ import annotations

import json
import time

import requests

from common import keys
from local.supabase_standin import sign
from workers.core.callbacks import encode

from .faults import Exchange
from .jobs import USER
from .soak.injector import Event
from .soak.invariants import Checker, job_id_of
from .soak.producer import SoakJob


def job(n: int, behaviour: str = "ok", queue: str = "sdxl_queue") -> SoakJob:
    job_id = f"soak-{queue.split('_')[0]}-{n:05d}-0000abcd"
    element = json.dumps([json.dumps({"id": job_id, "type": "sdxl_image_fast", "user_id": USER})]).encode()
    return SoakJob(job_id, queue, "sdxl_image_fast", behaviour, "rest", element, pushed_at=1.0)


def post(standin, body: bytes) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {standin.service_key}",
               "apikey": standin.service_key, "X-Callback-Signature": sign(body, standin.callback_secret)}
    assert requests.post(f"{standin.url}/functions/v1/job-callback", data=body, headers=headers,
                         timeout=10).status_code == 200


def upload(standin, path: str, data: bytes) -> None:
    headers = {"Authorization": f"Bearer {standin.service_key}", "apikey": standin.service_key,
               "Content-Type": "image/png", "x-upsert": "true"}
    assert requests.post(f"{standin.url}/storage/v1/object/workspace-temp/{path}", data=data, headers=headers,
                         timeout=10).status_code == 200


def completed(standin, j: SoakJob, run: str, store: bool = True) -> bytes:
    path = f"{USER}/{j.id}/0.png"
    if store:
        upload(standin, path, b"png!")
    asset = {"type": "image", "url": path, "thumbnail_url": None, "metadata": {"file_size_bytes": 4}}
    return encode(j.id, "soak-a-sdxl-0", "completed", [asset], None, {"run": run, "pid": 7})


def failed(j: SoakJob) -> bytes:
    return encode(j.id, "soak-a-sdxl-0", "failed", [], "no", {"error_type": "INVALID_PROMPT"})


def test_the_checker_flags_each_violation_with_its_evidence(redis_client, supabase_standin, tmp_path):
    s = supabase_standin
    good, lost, resent, twice, liar, no_files, stranded, outboxed, waiting = (job(n) for n in range(1, 10))
    fail_ok = job(10, "fail")
    liar.behaviour = "fail"
    post(s, completed(s, good, "r1"))
    body = completed(s, resent, "r2")
    post(s, body)
    post(s, body)                                           # the same bytes again: a re-delivery
    post(s, completed(s, twice, "r3"))
    post(s, completed(s, twice, "r4"))                      # a second run
    post(s, completed(s, liar, "r5"))
    post(s, completed(s, no_files, "r6", store=False))
    post(s, completed(s, outboxed, "r7"))
    post(s, failed(fail_ok))
    redis_client.rpush("sdxl_queue:processing:soak-b1-sdxl-0", stranded.element)
    redis_client.hset(keys.OUTBOX, outboxed.id, b"{}")
    redis_client.rpush(keys.dead("sdxl_queue"), good.element, fail_ok.element)
    redis_client.rpush("sdxl_queue", waiting.element)
    log = tmp_path / "orchestrator.log"
    log.write_text(f"sdxl | WARNING handed job {stranded.id} back\nother line\n")
    jobs = {j.id: j for j in (good, lost, resent, twice, liar, no_files, stranded, outboxed, waiting, fail_ok)}
    events = [Event(2.0, "redis_pause", "SIGSTOP redis-server for 3 s"), Event(900.0, "storage_500", "later")]

    verdict = Checker(jobs, s, redis_client, events, [log], epoch=time.time() - 5, run_end=10.0).verdict()

    found = {(v.kind, v.job_id) for v in verdict.violations}
    assert found == {("lost", lost.id), ("run twice", twice.id), ("false success", liar.id),
                     ("files missing", no_files.id), ("lost", stranded.id), ("stranded in processing", stranded.id),
                     ("stranded in outbox", outboxed.id), ("dead but not failed", good.id), ("lost", waiting.id),
                     ("left waiting", waiting.id)}
    assert (verdict.redelivered_jobs, verdict.redelivered_posts) == (1, 1)
    assert verdict.failed
    assert {c.name for c in verdict.checks if c.ok is False} == {
        "every job exactly one terminal callback", "completed jobs' files all in storage",
        "no success reported for a job told to fail", "queues empty", "processing lists empty", "outbox empty",
        "dead lists hold only failed jobs"}
    evidence = next(v.evidence for v in verdict.violations if v.kind == "stranded in processing")
    assert any("soak-b1-sdxl-0 (owner heartbeat gone, not in workers:active)" in line for line in evidence)
    assert f"log: sdxl | WARNING handed job {stranded.id} back" in evidence
    assert any(line.startswith("fault at 2.0 s: redis_pause") for line in evidence)
    assert not any("storage_500" in line for line in evidence)       # outside the job's time window
    twice_evidence = next(v.evidence for v in verdict.violations if v.kind == "run twice")
    assert [line.split(" by ")[0][-7:] for line in twice_evidence if line.startswith("callback")] == ["body #1",
                                                                                                     "body #2"]


def test_a_callback_sent_again_after_its_acknowledgement_is_a_duplicate(redis_client, supabase_standin):
    """The front's record of each POST decides: a copy sent again while no answer had come back within the
    caller's timeout is an at-least-once re-delivery; a copy sent after a 2xx had come back is a duplicate."""
    s = supabase_standin
    unanswered, acked, killed = job(1), job(2), job(3)
    bodies = {j.id: completed(s, j, j.id[-12:]) for j in (unanswered, acked, killed)}
    for body in bodies.values():
        post(s, body)
        post(s, body)
    now = time.time()
    exchanges = [Exchange(bodies[unanswered.id], now, now + 5.0, 200),    # answered after the 2 s timeout
                 Exchange(bodies[unanswered.id], now + 2.5, now + 2.6, 200),
                 Exchange(bodies[acked.id], now, now + 0.1, 200, 5151),    # acknowledged at once, by pid 5151
                 Exchange(bodies[acked.id], now + 0.5, now + 0.6, 200),
                 Exchange(bodies[killed.id], now + 10, now + 10.1, 200, 4242),  # answered, but its sender was
                 Exchange(bodies[killed.id], now + 20, now + 20.1, 200)]        # killed before it could record it
    events = [Event(0.05, "worker_sigkill", "SIGKILL", target="soak-a-sdxl-", pids=(4242,)),  # not 5151
              Event(10.05, "worker_sigkill", "SIGKILL", target="soak-a-sdxl-", pids=(4242,))]
    jobs = {unanswered.id: unanswered, acked.id: acked, killed.id: killed}
    verdict = Checker(jobs, s, redis_client, events, [], now, 1.0, exchanges, client_timeout=2.0).verdict()
    assert [(v.kind, v.job_id) for v in verdict.violations] == [("sent again after ack", acked.id)]
    assert (verdict.redelivered_jobs, verdict.redelivered_posts) == (2, 2)
    assert any(line.startswith("body #1 POSTed 2x: at ") for line in verdict.violations[0].evidence)


def test_a_clean_run_passes_and_every_element_form_is_read(redis_client, supabase_standin):
    s = supabase_standin
    one, two = job(1), job(2, "retry", "chat_queue")
    post(s, completed(s, one, "r1"))
    post(s, failed(two))
    redis_client.rpush(keys.dead("chat_queue"), json.dumps({"id": two.id}))
    verdict = Checker({one.id: one, two.id: two}, s, redis_client, [], [], time.time(), 1.0).verdict()
    assert verdict.violations == [] and not verdict.failed
    assert job_id_of(json.dumps([{"id": "x"}]).encode()) == "x" and job_id_of(b"\xff not json") is None

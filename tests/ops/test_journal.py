"""The job journal (workers/core/journal.py): the runner writes one record per terminal outcome, in the keys
table's capped list, with only the fields the ops page shows, never user text, and never at a job's expense."""
from __future__ import annotations

import json

from common import keys
from tests.conftest import SUPABASE_TEST_SERVICE_KEY
from tests.core.rig import Scripted
from workers.core.cancellation import CancelChecks, JobStatusLookup
from workers.core.errors import ErrorType, WorkerError
from workers.core.job import Queue
from workers.core.journal import Journal, error_type_of, record
from workers.core.transport import RedisProtocolTransport, TransportError

PROMPT = "a secret lighthouse prompt"


def journal(client) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(keys.JOURNAL, 0, -1)]


def push(client, job_id: str, **fields) -> None:
    job = {"id": job_id, "type": "sdxl_image_fast", "prompt": PROMPT, "user_id": "user-1", "config": {}, **fields}
    client.rpush("sdxl_queue", json.dumps([json.dumps(job)]))


def test_the_keys_table_names_every_job_queue():
    assert set(keys.QUEUES) == {q.value for q in Queue}


def test_completed_and_failed_jobs_are_journalled_newest_first_without_user_text(rig, redis_client):
    def behaviour(job, progress):
        if job.id.startswith("bad"):
            raise WorkerError(f"refused {PROMPT}", ErrorType.INVALID_PROMPT)
        return Scripted("w1").behaviour(job, progress)

    push(redis_client, "good-0123456789")
    push(redis_client, "bad-0123456789")
    push(redis_client, "invalid-job-1", type="no_such_type")
    runner = rig.runner("w1", Scripted("w1", behaviour))
    for _ in range(3):
        runner.process(runner.queue.fetch(0.1))
    records = journal(redis_client)
    assert [(r["id"], r["outcome"]) for r in records] == [("invalid-", "invalid"), ("bad-0123", "failed"),
                                                          ("good-012", "completed")]
    good, bad = records[2], records[1]
    assert good == {"id": "good-012", "type": "sdxl_image_fast", "outcome": "completed", "seconds": good["seconds"],
                    "worker": "w1", "attempt": 1, "error_type": None, "t": good["t"]}
    assert 0 <= good["seconds"] < 10 and good["t"] > 1.7e9
    assert bad["error_type"] == "INVALID_PROMPT" and bad["attempt"] == 1
    raw = b"".join(redis_client.lrange(keys.JOURNAL, 0, -1))
    assert PROMPT.encode() not in raw and b"refused" not in raw and b"good-0123456789" not in raw


def test_a_job_past_its_attempt_limit_is_journalled_dead(rig, redis_client):
    push(redis_client, "limit-job-1")
    redis_client.hset("sdxl_queue:attempts", "limit-job-1", 3)
    runner = rig.runner("w1", max_attempts=3)
    runner.process(runner.queue.fetch(0.1))
    (entry,) = journal(redis_client)
    assert (entry["outcome"], entry["attempt"], entry["error_type"]) == ("dead", 4, "INTERNAL_ERROR")


def test_the_journal_is_capped(redis_server, redis_client):
    writer = Journal(RedisProtocolTransport(redis_server.url, timeout=5), "w1", cap=5)
    for n in range(8):
        writer.write(f"job-{n}", "chat_conversation", "completed", 0.5, 1, b"{}")
    assert [r["id"] for r in journal(redis_client)] == ["job-7", "job-6", "job-5", "job-4", "job-3"]


def test_a_redis_error_while_journalling_is_swallowed():
    class Down:
        def command(self, *args):
            raise TransportError("redis: ConnectionError")

    Journal(Down(), "w1").write("job-1", "sdxl_image_fast", "completed", 1.0, 1, b"{}")  # no exception


def test_a_record_holds_only_its_fields():
    assert record("0123456789abcdef", "video_fast", "failed", -1.0, "pod-wan-0-abc", 2, "OOM_ERROR", 1.5) == {
        "id": "01234567", "type": "video_fast", "outcome": "failed", "seconds": 0.0, "worker": "pod-wan-0-abc",
        "attempt": 2, "error_type": "OOM_ERROR", "t": 1.5}
    assert error_type_of(b'{"metadata": {"error_type": "TIMEOUT_ERROR"}, "error_message": "x"}') == "TIMEOUT_ERROR"
    assert error_type_of(b"not json") is None and error_type_of(b"[1]") is None


def test_a_job_the_app_cancelled_is_journalled_cancelled(rig, redis_client, supabase_standin):
    supabase_standin.set_job_status("cancel-me-1", "cancelled")
    push(redis_client, "cancel-me-1")
    lookup = JobStatusLookup(supabase_standin.url, SUPABASE_TEST_SERVICE_KEY, timeout=2)
    runner = rig.runner("w1", cancel=CancelChecks(lookup, 1.0))
    runner.process(runner.queue.fetch(0.1))
    (entry,) = journal(redis_client)
    assert (entry["id"], entry["outcome"], entry["attempt"], entry["error_type"]) == ("cancel-m", "cancelled", 1, None)

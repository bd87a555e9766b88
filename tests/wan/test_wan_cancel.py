"""A WAN video the app cancels mid-run (issue 16 §1): the real ``WanHandler`` on the tiny demo models under the
real job loop (real Redis, the Supabase stand-in's ``jobs`` table over loopback HTTP, local storage). The
handler's ``progress`` is called after every denoising step, so the video stops at the first step after the
lookup said ``cancelled``: no MP4 is encoded or uploaded and no terminal callback is sent."""
from __future__ import annotations

import json
import threading
import time

from common import keys
from tests.conftest import SUPABASE_TEST_CALLBACK_SECRET, SUPABASE_TEST_SERVICE_KEY
from workers.core.callbacks import CallbackClient
from workers.core.cancellation import CancelChecks, JobStatusLookup, Verdict
from workers.core.handler import Progress, Result
from workers.core.job import Job, Queue
from workers.core.metrics import Metrics
from workers.core.queue import ReliableQueue
from workers.core.runner import Runner
from workers.core.storage import LocalStorage
from workers.core.transport import RedisProtocolTransport

from .conftest import SMALL

STEPS = 40
WAN_QUEUE = Queue.WAN.value


class Answers(JobStatusLookup):
    """The real lookup, noting when each answer came and what it said."""

    def __init__(self, url: str):
        super().__init__(url, SUPABASE_TEST_SERVICE_KEY, timeout=1.0)
        self.answers: list[tuple[float, Verdict]] = []

    def verdict(self, job_id: str) -> Verdict:
        answer = super().verdict(job_id)
        self.answers.append((time.monotonic(), answer))
        return answer


class Stepping:
    """The WAN handler, with each of its progress calls noted (when, and which step) on the way to the runner's."""

    queue, kind = Queue.WAN, "wan"

    def __init__(self, handler):
        self.handler = handler
        self.calls: list[tuple[float, str]] = []
        self.denoising = threading.Event()

    def run(self, job: Job, progress: Progress) -> Result:
        def noted(fraction: float, message: str = "") -> None:
            self.calls.append((time.monotonic(), message))
            if message.startswith("step 2/"):
                self.denoising.set()
            progress(fraction, message)
        return self.handler.run(job, noted)


def test_a_video_cancelled_mid_run_stops_at_the_next_step_and_uploads_nothing(handler, redis_server, redis_client,
                                                                              supabase_standin, tmp_path):
    body = {"id": "v1", "type": "video_fast", "user_id": "user-1", "prompt": "a cat on a red chair",
            "config": {**SMALL, "num_inference_steps": STEPS}}
    redis_client.rpush(WAN_QUEUE, json.dumps([json.dumps(body)]))
    stepping = Stepping(handler)
    lookup = Answers(supabase_standin.url)
    runner = Runner(handler=stepping, queue=ReliableQueue(transport=RedisProtocolTransport(redis_server.url, 5.0),
                                                          queue=WAN_QUEUE, worker_id="w1"),
                    callbacks=CallbackClient(supabase_standin.url, SUPABASE_TEST_SERVICE_KEY,
                                             SUPABASE_TEST_CALLBACK_SECRET, retry_seconds=2.0, timeout=2.0),
                    storage=LocalStorage(tmp_path, "workspace-temp"), metrics=Metrics(), worker_id="w1",
                    cancel=CancelChecks(lookup, every=0.05))
    threading.Thread(target=lambda: stepping.denoising.wait(60) and supabase_standin.set_job_status(
        "v1", "cancelled"), daemon=True).start()
    runner.process(runner.queue.fetch(1.0))

    steps = [(at, message) for at, message in stepping.calls if message.startswith("step ")]
    print(f"the video stopped after {len(steps)} of {STEPS} denoising steps")
    assert 2 <= len(steps) < STEPS, f"{len(steps)} of {STEPS} steps ran"
    answered = next(at for at, verdict in lookup.answers if verdict is Verdict.CANCELLED)
    assert sum(1 for at, _ in steps if at > answered) <= 1, "denoising went on after the cancellation was known"
    assert "encoding" not in [message for _, message in stepping.calls]
    assert not (tmp_path / "workspace-temp" / "user-1" / "v1").exists()
    assert redis_client.llen(WAN_QUEUE) == 0 and redis_client.llen(keys.processing(WAN_QUEUE, "w1")) == 0
    assert redis_client.exists(keys.done("v1")) and redis_client.hget(keys.OUTBOX, "v1") is None
    assert not redis_client.exists(keys.claim("v1"))
    time.sleep(0.2)
    assert [c.status for c in supabase_standin.callbacks("v1")] == ["processing"]

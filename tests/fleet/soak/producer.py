"""The soak's job stream: jobs of every type of the three queues, pushed the way the app's producers push them,
half over the Redis protocol (RPUSH of a JSON object or a one-element array) and half over Upstash REST
(``POST /rpush/<queue>`` with ``["{...}"]`` as the body: the current producer), at exponentially distributed
intervals. Each job tells the fake handler how to behave (a short or long sleep, a non-retryable failure, a
retryable one that ends in the dead list) and is recorded with what the checker may expect of it.

A push never straddles a Redis restart (``redis_lock``): an RPUSH whose reply was lost would leave the
producer unsure whether to push again, and a re-push is a fault of its own (``producer_repush``), injected
on purpose and counted, never by accident.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import requests

from workers.core.job import JobType

from ..jobs import USER

TYPES = {queue: [t.value for t in JobType if t.queue.value == queue]
         for queue in ("sdxl_queue", "wan_queue", "chat_queue")}
#: behaviour → weight. "ok"/"long" should complete; "fail" must fail (never complete); "retry" must end dead.
BEHAVIOURS = {"ok": 74, "long": 12, "fail": 6, "retry": 8}
PUSH_RETRY_SECONDS = 0.5


@dataclass
class SoakJob:
    id: str
    queue: str
    type: str
    behaviour: str
    via: str                 # "redis" or "rest"
    element: bytes
    pushed_at: float         # seconds after the start of the run
    pushes: int = 1          # more than 1: re-pushed on purpose
    images: int = 1

    @property
    def must_not_complete(self) -> bool:
        return self.behaviour in ("fail", "retry")


@dataclass
class Producer:
    client: redis.Redis
    rest_url: str
    rest_token: str
    rng: random.Random
    jobs_per_second: float
    clock: Callable[[], float]
    redis_lock: threading.Lock
    jobs: dict[str, SoakJob] = field(default_factory=dict)
    push_errors: int = 0
    _session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self._session.trust_env = False
        self._count = 0
        self._lock = threading.Lock()

    def run(self, stop: threading.Event, until: float) -> None:
        """Push jobs until ``until`` (run seconds) or ``stop``."""
        while not stop.is_set() and self.clock() < until:
            self.push(self.new_job())
            stop.wait(self.rng.expovariate(self.jobs_per_second))

    def new_job(self) -> SoakJob:
        rng = self.rng
        queue = rng.choice(tuple(TYPES))
        job_type = rng.choice(TYPES[queue])
        behaviour = rng.choices(tuple(BEHAVIOURS), tuple(BEHAVIOURS.values()))[0]
        self._count += 1
        job_id = f"soak-{queue.split('_')[0]}-{self._count:05d}-{rng.getrandbits(32):08x}"
        config: dict = {"sleep": round(rng.uniform(2.0, 4.0) if behaviour == "long" else rng.uniform(0.05, 0.6), 3)}
        if behaviour == "fail":
            config["fail"] = "INVALID_PROMPT"
        elif behaviour == "retry":
            config["retryable"] = True
        images = rng.choice((1, 1, 2, 3)) if queue == "sdxl_queue" else 1
        config["images"] = images
        job = {"id": job_id, "type": job_type, "user_id": USER, "prompt": f"soak {self._count}",
               "config": config, "metadata": {}}
        via = rng.choice(("redis", "rest"))
        if via == "rest":
            element = json.dumps([json.dumps(job)])                       # the current producer's form
        else:
            element = json.dumps(rng.choice((job, [job])))                # older producers' forms
        return SoakJob(job_id, queue, job_type, behaviour, via, element.encode(), self.clock(), images=images)

    def push(self, job: SoakJob) -> None:
        with self._lock:
            self.jobs.setdefault(job.id, job)
        while True:
            try:
                with self.redis_lock:
                    if job.via == "rest":
                        self._rest_push(job)
                    else:
                        self.client.rpush(job.queue, job.element)
                return
            except (redis.RedisError, requests.RequestException, RuntimeError):
                self.push_errors += 1
                time.sleep(PUSH_RETRY_SECONDS)

    def repush(self) -> SoakJob | None:
        """Push again one of the last jobs pushed (as a producer whose RPUSH reply timed out would)."""
        with self._lock:
            recent = list(self.jobs.values())[-5:]
        if not recent:
            return None
        job = self.rng.choice(recent)
        job.pushes += 1
        self.push(job)
        return job

    def _rest_push(self, job: SoakJob) -> None:
        answer = self._session.post(f"{self.rest_url}/rpush/{job.queue}", data=job.element,
                                    headers={"Authorization": f"Bearer {self.rest_token}"}, timeout=30)
        if answer.status_code != 200 or not isinstance(answer.json().get("result"), int):
            raise RuntimeError(f"REST push answered {answer.status_code}")

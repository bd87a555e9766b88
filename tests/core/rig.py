"""A job loop in the test process, on the real redis-server, the loopback Supabase stand-in and local storage.

``Rig`` builds ``Runner``s (one per simulated worker id) around a ``Scripted`` handler whose ``run`` is
whatever the test says, and runs their loops on threads. Nothing is stubbed: the runner talks to real Redis
through the real transport, POSTs real callbacks, and writes real files.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import keys
from tests.conftest import SUPABASE_TEST_CALLBACK_SECRET, SUPABASE_TEST_SERVICE_KEY
from workers.core.callbacks import CallbackClient
from workers.core.handler import Output, Progress, Result
from workers.core.job import Job, Queue
from workers.core.metrics import Metrics
from workers.core.queue import ReliableQueue
from workers.core.runner import Runner
from workers.core.storage import LocalStorage
from workers.core.transport import RedisProtocolTransport, Transport

Q = "sdxl_queue"


def element(job_id: str, **config: Any) -> bytes:
    """The current producer's form (a one-element JSON array holding the job's JSON text)."""
    job = {"id": job_id, "type": "sdxl_image_fast", "prompt": "p", "user_id": "user-1", "config": config}
    return json.dumps([json.dumps(job)]).encode()


def made_by(tag: str) -> Result:
    """A one-image result whose bytes say who made it (so storage shows which run wrote it)."""
    return Result([Output("0.png", f"made by {tag}".encode(), "image/png", "image", b"thumb " + tag.encode(),
                          {"width": 1, "height": 1})], {"made_by": tag})


class Hold:
    """A job that runs until the test lets it finish: ``started`` is set once it runs; set ``released`` to
    let it return ``made_by(tag)`` (it gives up waiting after ``patience`` seconds)."""

    def __init__(self, tag: str, patience: float = 10.0):
        self.tag, self.patience = tag, patience
        self.started, self.released = threading.Event(), threading.Event()

    def __call__(self, job: Job, progress: Progress) -> Result:
        self.started.set()
        self.released.wait(self.patience)
        return made_by(self.tag)


def process_on_a_thread(runner: Runner) -> threading.Thread:
    """Fetch one job and run it on a thread of its own, so the test can act while it runs."""
    thread = threading.Thread(target=runner.process, args=(runner.queue.fetch(0.1),))
    thread.start()
    return thread


class Scripted:
    """A handler that runs ``behaviour(job, progress)`` (default: a result made by ``tag``)."""

    kind = "fake"
    queue = Queue.SDXL

    def __init__(self, tag: str = "w", behaviour: Callable[[Job, Progress], Result] | None = None):
        self.tag = tag
        self.behaviour = behaviour or (lambda job, progress: made_by(tag))
        self.runs: list[str] = []

    def run(self, job: Job, progress: Progress) -> Result:
        self.runs.append(job.id)
        return self.behaviour(job, progress)


class Rig:
    def __init__(self, redis_url: str, standin, storage_root: Path, ttl: int = 30):
        self.redis_url = redis_url
        self.standin = standin
        self.storage = LocalStorage(storage_root, "workspace-temp")
        self.storage_root = storage_root / "workspace-temp"
        self.ttl = ttl
        self._loops: list[tuple[threading.Event, threading.Thread]] = []

    def transport(self, timeout: float = 5.0) -> Transport:
        return RedisProtocolTransport(self.redis_url, timeout=timeout)

    def queue(self, worker_id: str, transport: Transport | None = None, **kw: Any) -> ReliableQueue:
        kw.setdefault("poll_min", 0.01)
        kw.setdefault("poll_max", 0.05)
        return ReliableQueue(transport=transport or self.transport(), queue=Q, worker_id=worker_id,
                             heartbeat_ttl=kw.pop("ttl", self.ttl), **kw)

    def callbacks(self, retry_seconds: float = 2.0, timeout: float = 2.0) -> CallbackClient:
        return CallbackClient(self.standin.url, SUPABASE_TEST_SERVICE_KEY, SUPABASE_TEST_CALLBACK_SECRET,
                              retry_seconds=retry_seconds, timeout=timeout, sleep=lambda s: time.sleep(min(s, 0.05)))

    def runner(self, worker_id: str, handler: Scripted | None = None, queue: ReliableQueue | None = None,
               retry_seconds: float = 2.0, max_attempts: int = 3, **kw: Any) -> Runner:
        return Runner(handler=handler or Scripted(worker_id), queue=queue or self.queue(worker_id),
                      callbacks=self.callbacks(retry_seconds), storage=self.storage, metrics=Metrics(),
                      worker_id=worker_id, max_attempts=max_attempts, **kw)

    def loop(self, runner: Runner) -> threading.Event:
        """Run ``runner.run`` on a thread until the returned event is set (``close`` sets them all)."""
        stop = threading.Event()
        thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
        thread.start()
        self._loops.append((stop, thread))
        return stop

    def close(self) -> None:
        for stop, thread in self._loops:
            stop.set()
        for stop, thread in self._loops:
            thread.join(10)

    def stored(self, job_id: str, name: str = "0.png") -> bytes | None:
        path = self.storage_root / "user-1" / job_id / name
        return path.read_bytes() if path.exists() else None


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def held(client, worker_id: str) -> list[bytes]:
    return client.lrange(keys.processing(Q, worker_id), 0, -1)

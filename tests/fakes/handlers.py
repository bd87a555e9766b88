"""A fast, real handler for runtime tests: it makes a small PNG per job, and obeys test knobs in
``config``: ``sleep`` (seconds), ``crash`` (``"exit"`` kills the process mid-job), ``fail`` (an error type
name to raise as a non-retryable WorkerError), ``retryable`` (raise RetryableError), ``images`` (count),
``fatal`` (raise FatalWorkerError: the GPU is gone). ``load``/``unload`` take ``all`` or the handler's kind as
``which`` and refuse anything else with ``InvalidJob``, as the real kinds do. Per-process knobs in the
environment: ``FAKE_BROKEN`` (every job raises a CUDA-style RuntimeError: a poisoned GPU context),
``FAKE_SETUP_ERROR`` (``fatal`` or ``config``: ``setup()`` raises FatalWorkerError or ConfigError)."""
from __future__ import annotations

import io
import os
import time
from typing import Any

from PIL import Image

from common.errors import ConfigError
from common.settings import Settings
from workers.core.errors import ErrorType, FatalWorkerError, InvalidJob, RetryableError, WorkerError
from workers.core.handler import Output, Progress, Result
from workers.core.job import Job, Queue
from workers.media.thumbnail import thumbnail


class FakeHandler:
    kind = "fake"

    def __init__(self, queue: Queue):
        self.queue = queue
        self.loaded = False

    def setup(self) -> None:
        failure = os.environ.get("FAKE_SETUP_ERROR")
        if failure == "fatal":
            raise FatalWorkerError("the fake model could not be loaded")
        if failure == "config":
            raise ConfigError("FAKE_MODEL_PATH is not set")
        self.loaded = True

    def run(self, job: Job, progress: Progress) -> Result:
        config = job.config
        progress(0.1, "started")
        if config.get("crash") == "exit":
            os._exit(137)
        if os.environ.get("FAKE_BROKEN"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if config.get("fatal"):
            raise FatalWorkerError("the fake GPU is gone")
        time.sleep(float(config.get("sleep", 0)))
        if config.get("fail"):
            raise WorkerError("the fake handler was told to fail", ErrorType(config["fail"]))
        if config.get("retryable"):
            raise RetryableError("transient fake failure", ErrorType.STORAGE_ERROR)
        outputs = []
        for i in range(int(config.get("images", 1))):
            image = Image.new("RGB", (32, 16), (len(job.prompt) % 256, i * 40 % 256, 90))
            data = io.BytesIO()
            image.save(data, format="PNG")
            outputs.append(Output(f"{i}.png", data.getvalue(), "image/png", "image", thumbnail(image),
                                  {"width": 32, "height": 16, "seed": i}))
        # "run": a fresh token per run, so a second run of one job is told apart from a re-sent callback.
        return Result(outputs, {"seed": 0, "num_images": len(outputs), "pid": os.getpid(),
                                "run": os.urandom(6).hex()})

    def load(self, which: str) -> str:
        self._check(which)
        self.loaded = True
        return "loaded"

    def unload(self, which: str) -> str:
        self._check(which)
        self.loaded = False
        return "unloaded"

    def _check(self, which: str) -> None:
        if which not in ("all", self.kind):
            raise InvalidJob(f"'which' must be all or {self.kind}, got {which[:32]!r}")

    def status(self) -> dict[str, Any]:
        return {"loaded": self.loaded}


def create_handler(settings: Settings) -> FakeHandler:
    return FakeHandler(Queue(os.environ.get("FAKE_QUEUE", "sdxl_queue")))

"""The fake handler, logging as a real one does while it works: a line from the job's thread and one from a
thread pool it hands work to (``logs.carry``, as the WAN enhance pool does)."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from common import logs
from common.settings import Settings
from tests.fakes.handlers import FakeHandler
from workers.core.handler import Progress, Result
from workers.core.job import Job, Queue

log = logging.getLogger(__name__)
POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")


class LoggingHandler(FakeHandler):
    def run(self, job: Job, progress: Progress) -> Result:
        log.info("fake job: rendering")
        POOL.submit(logs.carry(log.info), "fake job: encoding on a pool thread").result()
        return super().run(job, progress)


def create_handler(settings: Settings) -> LoggingHandler:
    log.info("fake handler built")
    return LoggingHandler(Queue.SDXL)

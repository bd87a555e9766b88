"""A fake handler whose job can end the job loop thread itself (``config.escape``): an exception that is no
``Exception`` escapes the runner, as a bug in the loop would. The process stays up and ready on ``/health``,
but takes no job any more: what ``/live`` exists to notice."""
from __future__ import annotations

from common.settings import Settings
from tests.fakes.handlers import FakeHandler
from workers.core.handler import Progress, Result
from workers.core.job import Job, Queue


class Escaped(BaseException):
    """Not an ``Exception``: the runner's handlers do not catch it, so it ends the job loop thread."""


class EscapingHandler(FakeHandler):
    def run(self, job: Job, progress: Progress) -> Result:
        if job.config.get("escape"):
            raise Escaped("the job loop thread ends here")
        return super().run(job, progress)


def create_handler(settings: Settings) -> EscapingHandler:
    return EscapingHandler(Queue.SDXL)

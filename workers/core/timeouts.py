"""Each job type's deadline, apart from the runner that enforces it (``Runner._progress``) and the watchdog
that escalates past it: both read the same numbers, and the settings build them in one place."""
from __future__ import annotations

from dataclasses import dataclass

from common.settings import Settings

from .job import JobType, OutputKind, Queue


@dataclass(frozen=True)
class JobTimeouts:
    """Each job type's deadline in seconds (``JOB_TIMEOUT_*_SECONDS``), a little above the slowest expected
    job; past it the job's next ``progress`` call raises ``JobCancelled`` and the job is retried."""

    sdxl: float = 300.0
    wan_video: float = 1200.0
    wan_image: float = 300.0
    chat: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> JobTimeouts:
        return cls(sdxl=settings.job_timeout_sdxl_seconds, wan_video=settings.job_timeout_wan_video_seconds,
                   wan_image=settings.job_timeout_wan_image_seconds, chat=settings.job_timeout_chat_seconds)

    def seconds_for(self, job_type: JobType) -> float:
        if job_type.queue is Queue.SDXL:
            return self.sdxl
        if job_type.queue is Queue.CHAT:
            return self.chat
        return self.wan_video if job_type.output_kind is OutputKind.VIDEO else self.wan_image

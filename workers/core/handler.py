"""The extension points of a model worker: ``setup()`` once, then ``run(job, progress)`` per job (``Handler``),
and model control apart from it (``ModelControl``).

A handler returns a ``Result``: files to store (the runner uploads them to
``<user_id>/<job_id>/<name>`` and builds the callback's assets) and job metadata. It raises
``WorkerError`` subclasses for failures; anything else is treated as an internal error.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .job import Job, Queue

Progress = Callable[[float, str], None]
"""``progress(fraction_done, message)``: best effort and never blocks the job; it raises only ``JobCancelled``
(the job is past its deadline), which the handler lets propagate: the job's one cooperative cancellation point."""


@dataclass(frozen=True)
class Output:
    """One stored file of a result. ``name`` is the object name inside the job folder (``0.png``)."""

    name: str
    data: bytes
    content_type: str
    kind: str                      # "image" | "video": the asset type on the wire
    thumbnail: bytes | None = None  # WebP bytes, stored as ``<stem>.thumb.webp``
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    outputs: list[Output] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


class Handler(Protocol):
    """The job interface: what the runner calls. ``setup()`` once (in the service's background thread;
    ``/health`` answers 503 until it returns), then ``run()`` per job of ``queue``."""

    queue: Queue
    kind: str   # "sdxl" | "wan" | "chat" | ...: names the worker in its id, logs and memory reservations

    def setup(self) -> None:
        """Load models; raise ``FatalWorkerError`` when it cannot."""

    def run(self, job: Job, progress: Progress) -> Result:
        """Do one job of this handler's queue."""


class ModelControl(Protocol):
    """Model control, apart from jobs: what ``/memory/load``, ``/memory/unload``, ``/status`` and
    ``/memory/status`` use (through ``workers.core.residency``, under the GPU lock)."""

    def load(self, which: str) -> str:
        """(Re)load models (``which``: ``all`` or a kind-specific name); return a short message. An unknown
        ``which`` raises ``InvalidJob`` (400)."""

    def unload(self, which: str) -> str:
        """Free models and GPU memory; return a short message. Never called while a job runs. An unknown
        ``which`` raises ``InvalidJob`` (400)."""

    def status(self) -> dict[str, Any]:
        """What is loaded, device, capabilities (no secrets, no filesystem paths)."""


class WorkerHandler(Handler, ModelControl, Protocol):
    """What ``workers/<kind>/__init__.py:create_handler(settings)`` returns: one object, both interfaces; the
    service hands it to the runner as a ``Handler`` and to the residency as a ``ModelControl``. A kind's own
    HTTP routes are declared beside the factory (``create_routes``), not by the handler."""

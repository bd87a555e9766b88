"""The one extension point of a model worker: ``setup()`` once, then ``run(job, progress)`` per job.

A handler returns a ``Result``: files to store (the runner uploads them to
``<user_id>/<job_id>/<name>`` and builds the callback's assets) and job metadata. It raises
``WorkerError`` subclasses for failures; anything else is treated as an internal error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

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
    """What ``workers/<kind>/__init__.py:create_handler(settings)`` returns.

    The service (``workers.core.service``) calls ``setup()`` once in a background thread (``/health``
    answers 503 until it returns), runs the job loop over ``run()``, and serves the common routes
    (``/health``, ``/metrics``, ``/status``, ``/memory/status``, ``/memory/load``, ``/memory/unload``,
    ``/debug/env``) from the methods below; ``register_routes`` adds the kind's own routes.
    """

    queue: Queue
    kind: str   # "sdxl" | "wan" | "chat" | ...

    def setup(self) -> None:
        """Load models; raise ``FatalWorkerError`` when it cannot."""

    def run(self, job: Job, progress: Progress) -> Result:
        """Do one job of this handler's queue."""

    def load(self, which: str) -> str:
        """(Re)load models (``which``: ``all`` or a kind-specific name); return a short message."""

    def unload(self, which: str) -> str:
        """Free models and GPU memory; return a short message. Never called while a job runs."""

    def status(self) -> dict[str, Any]:
        """What is loaded, device, capabilities (no secrets, no filesystem paths)."""

    def register_routes(self, app: Any, service: Any) -> None:
        """Add kind-specific HTTP routes to the Flask ``app``."""

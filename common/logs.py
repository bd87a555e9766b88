"""One logging set-up for every process of the fleet: text by default, or one JSON object per line.

``LOG_FORMAT=text`` (the default) prints each process's lines exactly as its own format says.
``LOG_FORMAT=json`` prints one JSON object per line (python-json-logger): ``time`` (ISO 8601, UTC), ``level``,
``logger``, ``service``, ``message`` and ``exc_info`` when there is a traceback, so a log shipper (Loki,
Datadog, CloudWatch, RunPod's log view) can filter on fields instead of parsing text. gunicorn's own lines
(``serving.GunicornLogger``), ``warnings`` and exceptions that end a thread go through the same handler.

While a worker runs a job, every line logged on the job's thread also carries ``job_id``, ``job_type``,
``worker_id`` and ``attempt``: the runner binds them in a context variable (``bind_job``) and a filter on the
handler copies them onto each record. A thread the job starts keeps them when it runs its work in a copy of
the job's context (``carry``, ``contextvars.copy_context``): the WAN enhance pool, the progress callback.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar, copy_context
from typing import Any, TextIO, TypeVar

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
JOB_FIELDS = ("job_id", "job_type", "worker_id", "attempt")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
T = TypeVar("T")

_job: ContextVar[dict[str, Any] | None] = ContextVar("fleet_job", default=None)
_state = {"format": "text"}


def bind_job(job_id: str, job_type: str, worker_id: str, attempt: int) -> None:
    """From now on, lines logged in this context carry the job's four fields (until ``clear_job``)."""
    _job.set({"job_id": job_id, "job_type": job_type, "worker_id": worker_id, "attempt": attempt})


def clear_job() -> None:
    _job.set(None)


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` in a copy of this context, for one call on another thread: its lines keep the job's fields.
    (A context runs on one thread at a time: take a fresh ``carry`` per submitted call.)"""
    context = copy_context()

    def run(*args: Any, **kwargs: Any) -> T:
        return context.run(fn, *args, **kwargs)
    return run


def current_format() -> str:
    """The format the last ``configure`` installed (``serving.GunicornLogger`` follows it)."""
    return _state["format"]


class JobFields(logging.Filter):
    """Copies the bound job's fields onto each record (a handler filter: it sees every logger's records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job.get()
        if fields:
            for name, value in fields.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class FleetJsonFormatter(JsonFormatter):
    """python-json-logger's formatter, plus one case: a line the orchestrator relays from a child that is
    itself a JSON object (the child logs JSON too) is written as that object with ``program`` added, not
    nested as a string."""

    def format(self, record: logging.LogRecord) -> str:
        relayed = getattr(record, "relayed", None)
        if isinstance(relayed, dict):
            return json.dumps({**relayed, "program": getattr(record, "program", None)}, default=str,
                              ensure_ascii=False)
        return super().format(record)


def formatter(fmt: str, service: str, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    """The formatter of ``fmt`` (``text`` or ``json``); ``ValueError`` for anything else."""
    if fmt == "text":
        return logging.Formatter(text_format)
    if fmt == "json":
        return FleetJsonFormatter("{levelname}{name}{message}", style="{", timestamp="time",
                                  rename_fields={"levelname": "level", "name": "logger"},
                                  static_fields={"service": service}, json_ensure_ascii=False)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def configure(handlers: Sequence[logging.Handler], level: str | int, fmt: str, service: str,
              text_format: str = TEXT_FORMAT) -> None:
    """Replace the root logger's handlers with ``handlers``, each formatted as ``fmt`` and carrying the job
    fields filter."""
    chosen = formatter(fmt, service, text_format)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(chosen)
        handler.addFilter(JobFields())
        root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # torchao, installed for the opt-in FP8 (workers/gpu/fp8.py), is imported by transformers and diffusers
    # whenever present: it warns at every start that its C++ extensions, built for another torch, do not load,
    # and diffusers that it cannot import torchao's older tensor types (for loading torchao checkpoints, which
    # these workers never do); the FP8 path runs on torch._scaled_mm and needs neither. Errors still show.
    for name in ("torchao", "diffusers.quantizers.torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _state["format"] = fmt
    if fmt == "json":
        logging.captureWarnings(True)
        threading.excepthook = _log_thread_exception


def setup_logging(level: str | int, fmt: str = "text", *, service: str, text_format: str = TEXT_FORMAT,
                  stream: TextIO | None = None) -> None:
    """The set-up of an entry point: one stream handler (stdout unless ``stream``) in ``fmt``."""
    configure([logging.StreamHandler(stream or sys.stdout)], level, fmt, service, text_format)


def relayed(program: str, line: str) -> dict[str, Any]:
    """``extra`` of a line the orchestrator relays from ``program``: the parsed object when the line is a
    JSON object (written as is in JSON mode; ignored by the text format)."""
    extra: dict[str, Any] = {"program": program}
    if line.startswith("{"):
        try:
            value = json.loads(line)
        except ValueError:
            return extra
        if isinstance(value, dict):
            extra["relayed"] = value
    return extra


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """A thread that dies of an exception: one JSON line with its traceback instead of text on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger("threading").error("thread %s died", name,
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

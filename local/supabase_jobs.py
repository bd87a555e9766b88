"""The stand-in's ``jobs`` table behind Supabase's REST API (PostgREST): what a worker reads to learn that the
app cancelled a job (workers/core/cancellation.py).

Only the one query the workers make is served, ``GET /rest/v1/jobs?id=eq.<id>&select=status``: ``200
[{"status": ...}]`` for a known job, ``200 []`` for an unknown one, as PostgREST answers. Any other filter,
column or parameter is answered 400 (a worker asking something else is a bug to see, not to serve). The key
check is the stand-in's gateway (service key as Bearer and ``apikey``, else 401). Controls: ``set_status``,
``set_failing`` (every lookup answered with a status), ``set_hanging`` (every lookup held before its answer),
and ``lookups`` counts what was asked.
"""
from __future__ import annotations

import json
import threading

from flask import Flask, Response, request

ENDPOINT = "jobs_table"
PATH = "/rest/v1/jobs"


class JobsTable:
    """Job id → status, the failure controls and the lookups received. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, str] = {}
        self._asked: list[str | None] = []
        self._failing: int | None = None
        self._hang = 0.0
        self._released = threading.Event()

    def set_status(self, job_id: str, status: str | None) -> None:
        """The job's row now says ``status`` (``None``: the row is gone)."""
        with self._lock:
            if status is None:
                self._statuses.pop(job_id, None)
            else:
                self._statuses[job_id] = status

    def set_failing(self, status: int | None) -> None:
        """While set, every lookup is answered with ``status`` (a REST outage); ``None`` ends it."""
        with self._lock:
            self._failing = status

    def set_hanging(self, seconds: float) -> None:
        """Hold every lookup ``seconds`` before answering it (0: answer at once; ``release`` ends the holds)."""
        with self._lock:
            self._hang = seconds
            self._released = threading.Event()

    def release(self) -> None:
        """Answer every held lookup now (the stand-in's ``stop`` calls it, so no request outlives it)."""
        with self._lock:
            self._hang = 0.0
            self._released.set()

    def lookups(self, job_id: str | None = None) -> int:
        """Lookups received (every one, answered or failed), of ``job_id`` only when given."""
        with self._lock:
            return sum(1 for asked in self._asked if job_id is None or asked == job_id)

    def before_lookup(self) -> int | None:
        """The gateway's step for a lookup: count it, hold it while hanging; the failure status, if any."""
        raw = request.args.get("id", "")
        with self._lock:
            self._asked.append(raw.removeprefix("eq.") if raw.startswith("eq.") else None)
            hang, released = self._hang, self._released
        if hang:
            released.wait(hang)
        with self._lock:
            return self._failing

    def answer(self) -> Response:
        """PostgREST's answer to the one query served, or 400 for any other."""
        args = request.args
        job_id = args.get("id", "")
        if sorted(args) != ["id", "select"] or args.get("select") != "status" or not job_id.startswith("eq.") \
                or len(args.getlist("id")) != 1 or len(args.getlist("select")) != 1:
            return _json({"code": "PGRST100", "message": "only id=eq.<id>&select=status is served here",
                          "details": None, "hint": None}, 400)
        with self._lock:
            status = self._statuses.get(job_id.removeprefix("eq."))
        return _json([] if status is None else [{"status": status}])


def add_jobs_route(app: Flask, table: JobsTable) -> None:
    """``GET /rest/v1/jobs`` on the stand-in's app (its gateway runs ``table.before_lookup`` and the key check)."""
    app.add_url_rule(PATH, ENDPOINT, table.answer, methods=["GET"])


def _json(payload: object, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")

"""The input and errors of a worker's control routes (``/memory/load``, ``/memory/unload``).

Apart from ``service`` so that the routes stay a few lines: read ``which``, call the residency, map its
typed error to a status code.
"""
from __future__ import annotations

from flask import request

from common.http import ApiError, json_body

from .errors import InvalidJob, RetryableError, WorkerError


def control_error(exc: WorkerError) -> ApiError:
    """A handler's typed error on /memory/load|unload: bad ``which`` 400, no memory now 409, else 503."""
    if isinstance(exc, InvalidJob):
        return ApiError(400, exc.message)
    if isinstance(exc, RetryableError):
        return ApiError(409, exc.message)
    return ApiError(503, exc.message)


def which_argument() -> str:
    """``which`` from the query string, else the JSON body; absent (or null / "") means ``all``. A value of
    another type is a 400, never read as ``all`` (``{"which": []}`` must not unload everything)."""
    which = request.args.get("which")
    if which is None:
        which = json_body(optional=True).get("which")
    if which is None or which == "":
        return "all"
    if not isinstance(which, str):
        raise ApiError(400, "'which' must be a string")
    return which

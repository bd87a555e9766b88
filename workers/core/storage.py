"""Result storage (CONTRACT §3): Supabase Storage REST or a local directory with the same layout.

Objects live at ``<bucket>/<user_id>/<job_id>/<name>``. Both backends refuse any path component that
could leave that layout (``..``, separators, empty), so a hostile id never writes outside the bucket.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import requests

from common.settings import Settings

from . import retry
from .errors import ErrorType, RetryableError, WorkerError
from .metrics import Metrics

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")  # \Z, not $ (no trailing newline)
TRIES = 4            # 1, 2, 4 s of backoff (+ jitter) in between: STORAGE_RETRY_FIRST_SECONDS, doubling
LONGEST_WAIT = 8.0   # a Retry-After beyond it ends the tries: the job is retried later instead


class Storage(Protocol):
    def upload(self, path: str, data: bytes, content_type: str) -> str:
        """Store ``data`` at the bucket-relative ``path``; return the path. Raise ``WorkerError``."""


def object_path(user_id: str, job_id: str, name: str) -> str:
    """``<user_id>/<job_id>/<name>``, refusing anything that is not one safe path component each."""
    for part in (user_id, job_id, name):
        if not _COMPONENT.match(part) or ".." in part:
            raise WorkerError("unsafe storage path component", ErrorType.INVALID_JOB)
    return f"{user_id}/{job_id}/{name}"


def _check_path(path: str) -> list[str]:
    parts = path.split("/")
    if len(parts) != 3:
        raise WorkerError("storage path must be <user_id>/<job_id>/<name>", ErrorType.INVALID_JOB)
    object_path(*parts)
    return parts


class LocalStorage:
    """Writes ``<root>/<bucket>/<path>`` atomically (temp file + rename)."""

    def __init__(self, root: Path, bucket: str):
        self.root = Path(root) / bucket

    def upload(self, path: str, data: bytes, content_type: str) -> str:
        parts = _check_path(path)
        target = self.root.joinpath(*parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise RetryableError(f"local storage write failed ({exc.strerror})", ErrorType.STORAGE_ERROR) from None
        return path


class SupabaseStorage:
    """``POST {url}/storage/v1/object/<bucket>/<path>`` with the raw bytes, retried by ``retry.call`` on
    connection errors, 5xx, 408 and 429 (backoff with jitter from ``retry_first`` seconds, ``Retry-After``
    honoured up to 8 s); any other 4xx is final."""

    def __init__(self, url: str, service_key: str, bucket: str, session: requests.Session | None = None,
                 timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[retry.Answer], None] | None = None, retry_first: float = 1.0):
        if retry_first <= 0:
            raise ValueError(f"retry_first must be positive seconds, got {retry_first!r}")
        self.url = url.rstrip("/")
        self.retry_first = retry_first
        self.on_retry = on_retry   # told each failed try that is repeated (``worker_storage_retries_total``)
        self._key = service_key
        self.bucket = bucket
        self.session = session or requests.Session()
        self.timeout = timeout
        self.sleep = sleep

    def upload(self, path: str, data: bytes, content_type: str) -> str:
        _check_path(path)
        if not content_type or content_type == "application/octet-stream":
            raise WorkerError("uploads need an explicit content type", ErrorType.INTERNAL_ERROR)
        endpoint = f"{self.url}/storage/v1/object/{quote(self.bucket)}/{quote(path)}"
        headers = {"Authorization": f"Bearer {self._key}", "apikey": self._key,
                   "Content-Type": content_type, "x-upsert": "true"}
        made = 0

        def attempt() -> retry.Answer:
            nonlocal made
            made += 1
            try:
                response = self.session.post(endpoint, data=data, headers=headers, timeout=self.timeout)
            except requests.RequestException as exc:
                return retry.Answer(retry=True, problem=type(exc).__name__)
            if response.ok:
                return retry.Answer(path)
            problem = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                raise WorkerError(f"storage refused the upload ({problem})", ErrorType.STORAGE_ERROR)
            return retry.Answer(retry=True, retry_after=retry.retry_after(response.headers), problem=problem)

        answer = retry.call(attempt, initial=self.retry_first, cap=LONGEST_WAIT, tries=TRIES,
                            longest_wait=LONGEST_WAIT, sleep=self.sleep, on_retry=self.on_retry)
        if answer.retry:
            raise RetryableError(f"storage upload failed after {made} tries ({answer.problem})",
                                 ErrorType.STORAGE_ERROR)
        return answer.value


def from_settings(settings: Settings, metrics: Metrics | None = None) -> Storage:
    if settings.storage_dir is not None:
        return LocalStorage(settings.storage_dir, settings.storage_bucket)
    settings.require("supabase_url", "supabase_service_key")
    counted = (lambda answer: metrics.storage_retries.labels(answer.problem or "unknown").inc()) if metrics else None
    return SupabaseStorage(settings.supabase_url, settings.supabase_service_key.reveal(), settings.storage_bucket,
                           on_retry=counted, retry_first=settings.storage_retry_first_seconds)

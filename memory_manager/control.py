"""The memory manager's calls to the workers: health, ``/memory/status``, ``/memory/unload`` and ``/memory/load``.

Unload and load carry ``Authorization: Bearer <WORKER_ADMIN_KEY>`` and ``which`` both in the query string and
the JSON body. A worker answers 409 while it runs a job (it is busy: not unloaded).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from common.settings import Secret

from .ledger import WorkerPolicy


@dataclass(frozen=True)
class CallResult:
    ok: bool
    status: int | None  # HTTP status, None when the worker did not answer
    detail: str


class WorkerControl:
    def __init__(self, workers: Mapping[str, WorkerPolicy], admin_key: Secret | None,
                 session: requests.Session | None = None, timeout: float = 120.0, health_timeout: float = 3.0):
        self._workers = workers
        self._admin_key = admin_key
        self._session = session or requests.Session()
        self._session.trust_env = False
        self._timeout = timeout
        self._health_timeout = health_timeout

    def unload(self, worker: str, which: str = "all") -> CallResult:
        return self._control(worker, "unload", which)

    def load(self, worker: str, which: str = "all") -> CallResult:
        return self._control(worker, "load", which)

    def _control(self, worker: str, action: str, which: str) -> CallResult:
        if self._admin_key is None:
            return CallResult(False, None, "WORKER_ADMIN_KEY is not set")
        try:
            response = self._session.post(f"{self._workers[worker].url}/memory/{action}", params={"which": which},
                                          json={"which": which}, timeout=self._timeout,
                                          headers={"Authorization": f"Bearer {self._admin_key.reveal()}"})
        except requests.RequestException as exc:
            return CallResult(False, None, f"no answer ({type(exc).__name__})")
        if response.status_code == 200:
            return CallResult(True, 200, f"{action}ed")
        if response.status_code == 409:
            return CallResult(False, 409, "busy (a job is running)")
        return CallResult(False, response.status_code, f"HTTP {response.status_code}")

    def alive(self, worker: str) -> bool:
        """Whether the worker's /health answers at all (503 while loading still counts as alive)."""
        try:
            self._session.get(f"{self._workers[worker].url}/health", timeout=self._health_timeout)
        except requests.RequestException:
            return False
        return True

    def held(self, worker: str) -> dict[str, Any] | None:
        """``GET /memory/status`` → its ``memory_manager`` document (``MemoryClient.describe``: what the worker
        holds, whether it was unloaded); None when it does not answer or has no such document."""
        try:
            response = self._session.get(f"{self._workers[worker].url}/memory/status", timeout=self._health_timeout)
            value = response.json().get("memory_manager") if response.status_code == 200 else None
        except (requests.RequestException, ValueError, AttributeError):
            return None
        return value if isinstance(value, dict) else None

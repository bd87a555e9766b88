"""The client a worker uses: reserve before loading a model, release after unloading it.

    client = MemoryClient.from_settings(settings, worker="sdxl")
    grant = client.reserve()              # size from the manager's table, or reserve(gb=12.5, label="base")
    if grant.may_load:
        load the model
    ...
    client.release(grant)                 # after unloading

If the manager is down, slow or misconfigured, ``reserve`` logs it and answers UNAVAILABLE, which still
``may_load``: a worker never stops because the manager is away, and one that already holds its memory keeps
it. Only an explicit refusal (409: it does not fit and nothing could be unloaded) says not to load.
Each client has an ``instance`` id; the manager drops the reservations of a previous instance of the same
worker when a new one reserves (the worker restarted).

A worker serves :meth:`MemoryClient.describe` in its ``/memory/status`` (key ``memory_manager``): what it holds
and whether it was unloaded. A manager that restarts has lost its ledger; it reads this document from every
worker to take their reservations back (same ids, so their later release works) and to know which worker it
had evicted (to reload it).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from enum import Enum

import requests

from common.settings import Secret, Settings

log = logging.getLogger("workers.core.memory_client")


class Grant(str, Enum):
    GRANTED = "granted"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"  # manager down or not usable: proceed without it


@dataclass(frozen=True)
class ReserveResult:
    outcome: Grant
    id: str | None = None
    reason: str = ""
    gb: float | None = None  # granted: the size the manager booked
    label: str = "model"

    @property
    def may_load(self) -> bool:
        return self.outcome is not Grant.REFUSED


class MemoryClient:
    def __init__(self, base_url: str, worker: str, gpu: int, admin_key: Secret | None,
                 session: requests.Session | None = None, timeout: float = 150.0, instance: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.worker = worker
        self.gpu = gpu
        self.instance = instance or uuid.uuid4().hex
        self._admin_key = admin_key
        self._session = session or requests.Session()
        self._session.trust_env = False
        self._timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings, worker: str, gpu: int | None = None) -> MemoryClient:
        """``gpu`` defaults to ``settings.gpu_index`` (FLEET_GPU_INDEX, set by the orchestrator)."""
        return cls(settings.memory_manager_url, worker, settings.gpu_index if gpu is None else gpu,
                   settings.worker_admin_key)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._admin_key.reveal()}"} if self._admin_key is not None else {}

    def reserve(self, gb: float | None = None, label: str = "model") -> ReserveResult:
        body: dict = {"worker": self.worker, "gpu": self.gpu, "label": label, "instance": self.instance}
        if gb is not None:
            body["gb"] = gb
        try:
            response = self._session.post(f"{self.base_url}/reservations", json=body, headers=self._headers(),
                                          timeout=self._timeout)
            answer = response.json()
        except (requests.RequestException, ValueError) as exc:
            log.warning("memory manager unreachable (%s): loading %s without a reservation", type(exc).__name__,
                        label)
            return ReserveResult(Grant.UNAVAILABLE, reason="memory manager unreachable")
        if response.status_code == 200 and isinstance(answer, dict) and answer.get("success"):
            gb = answer.get("gb")
            return ReserveResult(Grant.GRANTED, str(answer.get("id")), gb=float(gb) if _is_number(gb) else None,
                                 label=label)
        if response.status_code == 409 and isinstance(answer, dict):
            reason = str(answer.get("reason", "refused"))
            log.warning("memory manager refused %s: %s", label, reason)
            return ReserveResult(Grant.REFUSED, reason=reason)
        log.warning("memory manager answered HTTP %d: loading %s without a reservation", response.status_code, label)
        return ReserveResult(Grant.UNAVAILABLE, reason=f"memory manager answered HTTP {response.status_code}")

    def describe(self, held: ReserveResult | None, unloaded: bool) -> dict:
        """The document a worker serves for the manager's census (see the module docstring)."""
        reservations = []
        if held is not None and held.outcome is Grant.GRANTED and held.id and held.gb is not None:
            reservations.append({"id": held.id, "gb": held.gb, "label": held.label})
        return {"worker": self.worker, "gpu": self.gpu, "instance": self.instance, "unloaded": bool(unloaded),
                "reservations": reservations}

    def release(self, grant: ReserveResult | str | None) -> bool:
        """Release a reservation (a result from :meth:`reserve`, or its id). False if it could not be done."""
        reservation_id = grant.id if isinstance(grant, ReserveResult) else grant
        if not reservation_id:
            return False
        try:
            response = self._session.delete(f"{self.base_url}/reservations/{reservation_id}",
                                            headers=self._headers(), timeout=10)
        except requests.RequestException as exc:
            log.warning("memory manager unreachable (%s): reservation %s not released", type(exc).__name__,
                        reservation_id)
            return False
        return response.status_code == 200


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

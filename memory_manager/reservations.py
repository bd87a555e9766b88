"""The body of ``POST /reservations`` decoded into a :class:`ReservationRequest`, and the policy's answer.

Every field is checked here, at the edge; a request that can never be granted as asked is an
``InvalidRequest`` (400) naming the field.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .ledger import Reservation, WorkerPolicy


class InvalidRequest(ValueError):
    """A reservation request that can never be granted as asked (400)."""


@dataclass(frozen=True)
class ReservationRequest:
    worker: str
    gpu: int
    gb: float
    priority: int
    label: str = "model"
    instance: str = ""

    @classmethod
    def decode(cls, body: Mapping[str, Any], workers: Mapping[str, WorkerPolicy], gpu_count: int
               ) -> ReservationRequest:
        worker = body.get("worker")
        if not isinstance(worker, str) or worker not in workers:
            raise InvalidRequest("worker must be one of " + ", ".join(workers))
        policy = workers[worker]
        gpu = body.get("gpu", 0)
        if not is_index(gpu, gpu_count):
            raise InvalidRequest(f"gpu must be an integer from 0 to {gpu_count - 1}")
        gb = body.get("gb", policy.size_gb)
        if not is_size(gb):
            raise InvalidRequest("gb must be a number greater than 0")
        priority = body.get("priority", policy.priority)
        if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 100:
            raise InvalidRequest("priority must be an integer from 1 to 100")
        label, instance = body.get("label", "model"), body.get("instance", "")
        if not isinstance(label, str) or not isinstance(instance, str) or len(label) > 64 or len(instance) > 128:
            raise InvalidRequest("label and instance must be short strings")
        return cls(worker, gpu, float(gb), priority, label or "model", instance)


@dataclass(frozen=True)
class Decision:
    granted: bool
    reservation: Reservation | None = None
    reason: str = ""
    unloaded: tuple[str, ...] = ()


def is_index(value: Any, count: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


def is_size(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 100_000

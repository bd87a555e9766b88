"""The VRAM ledger: reservations per worker per GPU, and the arithmetic on them. No I/O.

Amounts are GiB (2**30 bytes), called "gb" on the wire as in the rest of the fleet's settings.
A GPU's *available* memory is the smaller of what the ledger leaves (total − reserved) and what the probe
sees free, minus a safety margin: the ledger counts memory promised but not loaded yet, the probe counts
memory held by anything the ledger does not know.
"""
from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class Pressure(str, Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @classmethod
    def of(cls, free_gb: float, critical: float, high: float, medium: float) -> Pressure:
        if free_gb < critical:
            return cls.CRITICAL
        if free_gb < high:
            return cls.HIGH
        if free_gb < medium:
            return cls.MEDIUM
        return cls.LOW


class Residency(str, Enum):
    """How a worker's model lives on the GPU (the seed policy)."""

    ALWAYS = "always"                # SDXL: loaded at start, never asked to unload by the policy
    WHEN_POSSIBLE = "when_possible"  # chat: loaded when memory allows, gives way to on-demand work, reloaded
    ON_DEMAND = "on_demand"          # WAN: loaded for its work, may displace WHEN_POSSIBLE workers

    @property
    def evictable(self) -> bool:
        return self is not Residency.ALWAYS


@dataclass(frozen=True)
class WorkerPolicy:
    name: str
    priority: int  # 1 = most important
    residency: Residency
    size_gb: float
    url: str       # the worker's loopback base URL (for /health, /status, /memory/load|unload)


@dataclass(frozen=True)
class GpuMemory:
    index: int
    total_gb: float
    free_gb: float


@dataclass(frozen=True)
class Reservation:
    id: str
    worker: str
    gpu: int
    gb: float
    priority: int
    label: str
    instance: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    t: float
    kind: str  # grant, refuse, release, unload, reload, drop, replace, emergency
    worker: str
    gpu: int | None
    gb: float | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def available_gb(gpu: GpuMemory, reserved: float, margin: float) -> float:
    return min(gpu.total_gb - reserved, gpu.free_gb) - margin


def effective_free_gb(gpu: GpuMemory, reserved: float) -> float:
    """Free memory for the pressure level: the probe's view, or the ledger's when that is lower."""
    return max(0.0, min(gpu.total_gb - reserved, gpu.free_gb))


class Ledger:
    """Reservations and the event history. Thread-safe; every method is short (no I/O under the lock).

    Reservation ids are ``r<n>.<boot>``: ``boot`` is random per ledger, so an id issued by a previous manager
    process (held by a worker across a manager restart) never names a new, unrelated reservation.
    """

    def __init__(self, history_size: int = 500, clock: Callable[[], float] = time.time):
        self._lock = threading.Lock()
        self._reservations: dict[str, Reservation] = {}
        self._instances: dict[str, str] = {}  # worker → the instance id it last reserved with
        self._ids = itertools.count(1)
        self.boot = secrets.token_hex(3)
        self.history: deque[Event] = deque(maxlen=history_size)
        self.pressure: deque[dict[str, Any]] = deque(maxlen=history_size)
        self.clock = clock

    def record(self, kind: str, worker: str, gpu: int | None, gb: float | None, detail: str) -> Event:
        event = Event(round(self.clock(), 3), kind, worker, gpu, gb, detail)
        self.history.append(event)
        return event

    def add(self, worker: str, gpu: int, gb: float, priority: int, label: str, instance: str) -> Reservation:
        with self._lock:
            reservation = Reservation(f"r{next(self._ids)}.{self.boot}", worker, gpu, gb, priority, label, instance,
                                      round(self.clock(), 3))
            self._keep(reservation)
            return reservation

    def adopt(self, reservation: Reservation) -> None:
        """Take back a reservation a worker holds from a previous manager process (its id unchanged)."""
        with self._lock:
            self._keep(reservation)

    def _keep(self, reservation: Reservation) -> None:
        self._reservations[reservation.id] = reservation
        if reservation.instance:
            self._instances[reservation.worker] = reservation.instance

    def get(self, reservation_id: str) -> Reservation | None:
        with self._lock:
            return self._reservations.get(reservation_id)

    def remove(self, reservation_id: str) -> Reservation | None:
        with self._lock:
            return self._reservations.pop(reservation_id, None)

    def take(self, match: Callable[[Reservation], bool]) -> list[Reservation]:
        """Remove and return every reservation that ``match`` selects."""
        with self._lock:
            gone = [r for r in self._reservations.values() if match(r)]
            for r in gone:
                del self._reservations[r.id]
            return gone

    def restore(self, reservations: Iterable[Reservation]) -> None:
        """Put back reservations taken out by :meth:`take` (a decision that did not go through)."""
        with self._lock:
            for r in reservations:
                self._reservations[r.id] = r

    def instance_of(self, worker: str) -> str | None:
        with self._lock:
            return self._instances.get(worker)

    def all(self) -> list[Reservation]:
        with self._lock:
            return list(self._reservations.values())

    def on_gpu(self, gpu: int) -> list[Reservation]:
        return [r for r in self.all() if r.gpu == gpu]

    def of_worker(self, worker: str, gpu: int | None = None) -> list[Reservation]:
        return [r for r in self.all() if r.worker == worker and (gpu is None or r.gpu == gpu)]

    def reserved_gb(self, gpu: int) -> float:
        return sum(r.gb for r in self.on_gpu(gpu))

    def workers(self) -> set[str]:
        return {r.worker for r in self.all()}


def gpu_view(gpus: Iterable[GpuMemory], ledger: Ledger, margin: float,
             thresholds: Mapping[str, float]) -> list[dict[str, Any]]:
    """The per-GPU numbers shown by /memory/status."""
    rows = []
    for gpu in gpus:
        reserved = ledger.reserved_gb(gpu.index)
        free = effective_free_gb(gpu, reserved)
        rows.append({"index": gpu.index, "total_gb": round(gpu.total_gb, 2), "free_gb": round(gpu.free_gb, 2),
                     "reserved_gb": round(reserved, 2),
                     "available_gb": round(max(0.0, available_gb(gpu, reserved, margin)), 2),
                     "pressure": Pressure.of(free, thresholds["critical"], thresholds["high"],
                                             thresholds["medium"]).value,
                     "workers": sorted({r.worker for r in ledger.on_gpu(gpu.index)})})
    return rows

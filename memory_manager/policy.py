"""The seed memory policy: who may load, who gives way, who comes back.

Table (sizes from ``MEMORY_SIZES_GB``):

    worker  priority  residency       default size
    sdxl    1         always          10 GB   never asked to unload by the policy
    chat    2         when_possible   15 GB   loaded when memory allows; gives way to on-demand work
    wan     3         on_demand       30 GB   loaded for its work

A reservation ``{worker, gpu, gb}`` is granted when it fits the GPU's available memory. When it does not,
the policy asks idle workers *on that GPU* to unload (``POST /memory/unload``, admin key) — those of lower
priority than the requester, and ``when_possible`` ones — least important first, until it fits; a worker
that answers 409 is busy and keeps its memory. If it still does not fit: refused (409) with the reason.
Predictive reload (on each tick): a ``when_possible`` worker that the policy unloaded is asked to load again
(``POST /memory/load``) once every on-demand worker on its GPU has been idle for ``reload_quiet`` seconds and
its size fits.

Ledger consistency: a re-reservation of the same (worker, gpu, label) replaces the old one; a reservation from
a new instance of a worker (it restarted) drops everything the old instance held; a worker whose ``/health``
has not answered for ``dead_after`` ticks loses its reservations.

Locks: decisions are serialised by one lock, held while calling ``/memory/unload`` — the worker's own
``DELETE /reservations/<id>`` during its unload only touches the ledger, so it never waits on it. Loads are
called outside the lock (the loading worker reserves through this same policy).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .config import MemorySettings
from .control import WorkerControl
from .ledger import GpuMemory, Ledger, Reservation, Residency, WorkerPolicy, available_gb, gpu_view
from .probe import Probe

log = logging.getLogger("memory_manager")

SEED_TABLE = {"sdxl": (1, Residency.ALWAYS), "chat": (2, Residency.WHEN_POSSIBLE), "wan": (3, Residency.ON_DEMAND)}


def seed_policies(settings: MemorySettings, urls: Mapping[str, str]) -> dict[str, WorkerPolicy]:
    return {name: WorkerPolicy(name, priority, residency, settings.sizes_gb[name], urls[name])
            for name, (priority, residency) in SEED_TABLE.items()}


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
               ) -> "ReservationRequest":
        worker = body.get("worker")
        if not isinstance(worker, str) or worker not in workers:
            raise InvalidRequest("worker must be one of " + ", ".join(workers))
        policy = workers[worker]
        gpu = body.get("gpu", 0)
        if not isinstance(gpu, int) or isinstance(gpu, bool) or not 0 <= gpu < gpu_count:
            raise InvalidRequest(f"gpu must be an integer from 0 to {gpu_count - 1}")
        gb = body.get("gb", policy.size_gb)
        if not isinstance(gb, (int, float)) or isinstance(gb, bool) or not 0 < gb <= 100_000:
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


@dataclass
class _Watch:
    misses: dict[str, int] = field(default_factory=dict)        # worker → /health checks without an answer
    evicted: dict[tuple[str, int], float] = field(default_factory=dict)  # (worker, gpu) → when we unloaded it
    idle_since: dict[str, float] = field(default_factory=dict)  # on-demand worker → first tick seen idle


class MemoryPolicy:
    def __init__(self, ledger: Ledger, probe: Probe, workers: Mapping[str, WorkerPolicy], control: WorkerControl,
                 settings: MemorySettings, clock: Callable[[], float] | None = None):
        self.ledger = ledger
        self.probe = probe
        self.workers = dict(workers)
        self.control = control
        self.settings = settings
        self.clock = clock or ledger.clock
        self._decide = threading.Lock()
        self._watch = _Watch()

    # ------------------------------------------------------------------ views
    def gpu(self, index: int) -> GpuMemory:
        return next(g for g in self.probe.gpus() if g.index == index)

    def available(self, index: int) -> float:
        return available_gb(self.gpu(index), self.ledger.reserved_gb(index), self.settings.safety_margin_gb)

    def thresholds(self) -> dict[str, float]:
        s = self.settings
        return {"critical": s.critical_gb, "high": s.high_gb, "medium": s.medium_gb}

    def status(self) -> dict[str, Any]:
        return {"gpus": gpu_view(self.probe.gpus(), self.ledger, self.settings.safety_margin_gb, self.thresholds()),
                "reservations": [r.to_json() for r in self.ledger.all()],
                "probe": self.probe.name,
                "policy": {w.name: {"priority": w.priority, "residency": w.residency.value, "size_gb": w.size_gb}
                           for w in self.workers.values()},
                "thresholds_gb": self.thresholds()}

    def report(self) -> dict[str, Any]:
        return {**self.status(), "history": [e.to_json() for e in self.ledger.history],
                "pressure_history": list(self.ledger.pressure),
                "evicted": [{"worker": w, "gpu": g, "since": t} for (w, g), t in self._watch.evicted.items()]}

    # ------------------------------------------------------------------ reservations
    def reserve(self, request: ReservationRequest) -> Decision:
        with self._decide:
            self._forget_old_instance(request)
            replaced = self.ledger.take(lambda r: (r.worker, r.gpu, r.label)
                                        == (request.worker, request.gpu, request.label))
            unloaded: list[str] = []
            notes: list[str] = []
            if request.gb > self.available(request.gpu):
                for candidate in self._eviction_candidates(request):
                    result = self.control.unload(candidate)
                    if result.ok:
                        self._evicted(candidate, request.gpu, f"unloaded for {request.worker}")
                        unloaded.append(candidate)
                        if request.gb <= self.available(request.gpu):
                            break
                    else:
                        notes.append(f"{candidate} {result.detail}")
            available = self.available(request.gpu)
            if request.gb <= available:
                if replaced:
                    self.ledger.record("replace", request.worker, request.gpu, sum(r.gb for r in replaced),
                                       "re-reservation replaces the previous one")
                reservation = self.ledger.add(request.worker, request.gpu, request.gb, request.priority,
                                              request.label, request.instance)
                self._watch.evicted.pop((request.worker, request.gpu), None)
                self.ledger.record("grant", request.worker, request.gpu, request.gb,
                                   f"id {reservation.id}" + (f", after unloading {', '.join(unloaded)}"
                                                              if unloaded else ""))
                return Decision(True, reservation, "", tuple(unloaded))
            self.ledger.restore(replaced)  # refused: the worker keeps what it held
            reason = self._refusal(request, available, notes)
            self.ledger.record("refuse", request.worker, request.gpu, request.gb, reason)
            log.warning("refused %s %.1f GB on GPU %d: %s", request.worker, request.gb, request.gpu, reason)
            return Decision(False, None, reason, tuple(unloaded))

    def release(self, reservation_id: str) -> Reservation | None:
        reservation = self.ledger.remove(reservation_id)
        if reservation is not None:
            self.ledger.record("release", reservation.worker, reservation.gpu, reservation.gb,
                               f"id {reservation.id}")
        return reservation

    def _forget_old_instance(self, request: ReservationRequest) -> None:
        previous = self.ledger.instance_of(request.worker)
        if request.instance and previous and previous != request.instance:
            dropped = self.ledger.take(lambda r: r.worker == request.worker and r.instance == previous)
            if dropped:
                self.ledger.record("replace", request.worker, None, sum(r.gb for r in dropped),
                                   "the worker restarted: its previous instance's reservations are dropped")

    def _eviction_candidates(self, request: ReservationRequest) -> list[str]:
        holders = {r.worker for r in self.ledger.on_gpu(request.gpu)} - {request.worker}
        candidates = [self.workers[w] for w in holders
                      if self.workers[w].residency.evictable
                      and (self.workers[w].residency is Residency.WHEN_POSSIBLE
                           or self.workers[w].priority > request.priority)]
        return [w.name for w in sorted(candidates, key=lambda w: -w.priority)]

    def _evicted(self, worker: str, gpu: int, why: str, reload: bool = True) -> None:
        """``worker`` unloaded: its reservations on ``gpu`` go; a when_possible worker is remembered for reload."""
        dropped = self.ledger.take(lambda r: r.worker == worker and r.gpu == gpu)
        self.ledger.record("unload", worker, gpu, sum(r.gb for r in dropped), why)
        if reload and self.workers[worker].residency is Residency.WHEN_POSSIBLE:
            self._watch.evicted[(worker, gpu)] = self.clock()
        log.info("unloaded %s on GPU %d (%s)", worker, gpu, why)

    def _refusal(self, request: ReservationRequest, available: float, notes: list[str]) -> str:
        others = [r.worker for r in self.ledger.on_gpu(request.gpu) if r.worker != request.worker]
        protected = sorted({w for w in others if w not in self._eviction_candidates(request)})
        parts = [f"needs {request.gb:g} GB on GPU {request.gpu}, {max(0.0, available):.1f} GB available"]
        parts += notes
        if protected:
            parts.append("not unloadable for this request: " + ", ".join(protected))
        return "; ".join(parts)

    # ------------------------------------------------------------------ periodic work
    def tick(self) -> None:
        """Sample pressure, drop the reservations of dead workers, reload evicted workers when possible."""
        now = self.clock()
        gpus = gpu_view(self.probe.gpus(), self.ledger, self.settings.safety_margin_gb, self.thresholds())
        self.ledger.pressure.append({"t": round(now, 3), "gpus": [
            {k: g[k] for k in ("index", "free_gb", "reserved_gb", "pressure")} for g in gpus]})
        self.sweep(self.settings.dead_after_checks)
        for worker, gpu in self._reload_candidates(now):
            result = self.control.load(worker)
            self.ledger.record("reload", worker, gpu, self.workers[worker].size_gb,
                               "predictive reload: " + ("asked to load" if result.ok else result.detail))
            if result.ok:
                self._watch.evicted.pop((worker, gpu), None)

    def sweep(self, dead_after: int) -> list[Reservation]:
        """Drop the reservations of workers whose /health has not answered ``dead_after`` checks in a row."""
        dropped: list[Reservation] = []
        for worker in self.ledger.workers():
            if self.control.alive(worker):
                self._watch.misses.pop(worker, None)
                continue
            misses = self._watch.misses.get(worker, 0) + 1
            self._watch.misses[worker] = misses
            if misses >= dead_after:
                gone = self.ledger.take(lambda r, dead=worker: r.worker == dead)
                self._watch.misses.pop(worker, None)
                if gone:
                    self.ledger.record("drop", worker, None, sum(r.gb for r in gone),
                                       f"/health did not answer {misses} time(s): reservations dropped")
                    log.warning("%s: /health not answering: dropped %d reservation(s)", worker, len(gone))
                dropped += gone
        return dropped

    def _reload_candidates(self, now: float) -> list[tuple[str, int]]:
        ready = []
        with self._decide:
            for (worker, gpu), _since in list(self._watch.evicted.items()):
                if self.ledger.of_worker(worker, gpu):
                    self._watch.evicted.pop((worker, gpu), None)  # it came back by itself
                    continue
                if self._on_demand_quiet(gpu, now) and self.workers[worker].size_gb <= self.available(gpu):
                    ready.append((worker, gpu))
        return ready

    def _on_demand_quiet(self, gpu: int, now: float) -> bool:
        quiet = True
        for worker in {r.worker for r in self.ledger.on_gpu(gpu)}:
            if self.workers[worker].residency is not Residency.ON_DEMAND:
                continue
            if self.control.busy(worker) is False:
                since = self._watch.idle_since.setdefault(worker, now)
                quiet &= now - since >= self.settings.reload_quiet_seconds
            else:
                self._watch.idle_since.pop(worker, None)
                quiet = False
        return quiet

    # ------------------------------------------------------------------ emergencies
    def free_for(self, worker: str, gpu: int, gb: float) -> dict[str, Any]:
        """Emergency: unload idle workers on ``gpu`` (any residency, least important first) until ``gb`` fits."""
        with self._decide:
            unloaded, notes = [], []
            holders = sorted({r.worker for r in self.ledger.on_gpu(gpu)} - {worker},
                             key=lambda w: -self.workers[w].priority)
            for candidate in holders:
                if gb <= self.available(gpu):
                    break
                result = self.control.unload(candidate)
                if result.ok:
                    self._evicted(candidate, gpu, f"emergency request of {worker}")
                    unloaded.append(candidate)
                else:
                    notes.append(f"{candidate} {result.detail}")
            available = self.available(gpu)
            satisfied = gb <= available
            self.ledger.record("emergency", worker, gpu, gb, ("satisfied" if satisfied else "not satisfied")
                               + (f"; unloaded {', '.join(unloaded)}" if unloaded else ""))
            return {"satisfied": satisfied, "available_gb": round(max(0.0, available), 2), "unloaded": unloaded,
                    "notes": notes}

    def cleanup(self) -> list[Reservation]:
        """Emergency: drop at once the reservations of every worker whose /health does not answer."""
        dropped = self.sweep(dead_after=1)
        self.ledger.record("emergency", ",".join(sorted({r.worker for r in dropped})) or "-", None,
                           sum(r.gb for r in dropped), f"force_cleanup: {len(dropped)} reservation(s) dropped")
        return dropped

    def unload_all_except(self, keep: set[str], gpu: int | None) -> dict[str, Any]:
        """Emergency: unload every worker not in ``keep`` (on ``gpu`` only, if given). Busy ones answer 409."""
        with self._decide:
            results = {}
            for worker in sorted(self.workers, key=lambda w: -self.workers[w].priority):
                held = {r.gpu for r in self.ledger.of_worker(worker)}
                if worker in keep or (gpu is not None and gpu not in held):
                    continue
                result = self.control.unload(worker)
                results[worker] = result.detail
                for index in held if result.ok else ():
                    self._evicted(worker, index, "force_unload_all_except", reload=False)
            self.ledger.record("emergency", ",".join(sorted(keep)) or "-", gpu, None,
                               "force_unload_all_except: " + ", ".join(f"{w} {d}" for w, d in results.items()))
            return {"results": results}

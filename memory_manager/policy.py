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
(``POST /memory/load``) once its size has fitted the GPU's available memory on every tick for ``reload_quiet``
seconds. Available memory already counts every reservation held, a busy WAN's included (and, with a real probe,
what the GPU really has free), so a WAN backlog does not starve the reload while chat fits beside it; the
quiet period keeps a passing gap from causing a reload that the next on-demand load would undo.

After a restart (the census): the manager's ledger is in memory, so a new manager process starts empty. On
each tick, until a worker has answered once, it reads the worker's ``/memory/status`` document
(``MemoryClient.describe``): reservations issued by an earlier manager process are adopted with their ids (the
worker releases them by id later), and a ``when_possible`` worker that says it is unloaded is remembered as
evicted, so the rule above reloads it.

Ledger consistency: a re-reservation of the same (worker, gpu, label) replaces the old one; a reservation from
a new instance of a worker (it restarted) drops everything the old instance held; an *instance* whose worker's
``/health`` has not answered for ``dead_after`` ticks loses its reservations (a successor that reserved in the
meantime keeps its own).

Locks: decisions are serialised by one lock, ``_decide``, which is never held across a call to a worker. An
unload may take up to ``MEMORY_WORKER_TIMEOUT_SECONDS`` (a wedged worker takes all of it), so it is called
outside the lock and only the request that needs that worker's memory waits for it; every other reservation
and the tick go on. A worker being unloaded is claimed (``_unloading``) so that no second request asks it at
the same time (that request is refused, with the reason). The worker's own ``DELETE /reservations/<id>`` during
its unload takes the lock only briefly. Loads are called outside the lock too (the loading worker reserves
through this same policy).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import MemorySettings
from .control import WorkerControl
from .ledger import GpuMemory, Ledger, Reservation, Residency, WorkerPolicy, available_gb, gpu_view
from .probe import Probe
from .reservations import Decision, ReservationRequest, is_index, is_size

log = logging.getLogger("memory_manager")

SEED_TABLE = {"sdxl": (1, Residency.ALWAYS), "chat": (2, Residency.WHEN_POSSIBLE), "wan": (3, Residency.ON_DEMAND)}
BEING_UNLOADED = "is being unloaded for another request"


def seed_policies(settings: MemorySettings, urls: Mapping[str, str]) -> dict[str, WorkerPolicy]:
    return {name: WorkerPolicy(name, priority, residency, settings.sizes_gb[name], urls[name])
            for name, (priority, residency) in SEED_TABLE.items()}


@dataclass
class _Watch:
    misses: dict[tuple[str, str], int] = field(default_factory=dict)      # (worker, instance) → silent checks
    evicted: dict[tuple[str, int], float] = field(default_factory=dict)   # (worker, gpu) → when it was unloaded
    room_since: dict[tuple[str, int], float] = field(default_factory=dict)  # evicted → since when it has fitted
    unheard: set[str] = field(default_factory=set)           # workers the census has not heard from yet
    released_unknown: set[str] = field(default_factory=set)  # ids released before the census saw them


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
        self._unloading: set[str] = set()  # workers an unload call is in flight for
        self._watch = _Watch(unheard=set(self.workers))

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
        with self._decide:
            evicted = [{"worker": w, "gpu": g, "since": t} for (w, g), t in self._watch.evicted.items()]
            unloading = sorted(self._unloading)
        return {**self.status(), "history": [e.to_json() for e in self.ledger.history],
                "pressure_history": list(self.ledger.pressure), "evicted": evicted, "unloading": unloading}

    # ------------------------------------------------------------------ reservations
    def reserve(self, request: ReservationRequest) -> Decision:
        with self._decide:
            self._forget_old_instance(request)
            granted = self._grant(request, [])
            if granted is not None:
                return granted
            wanted = {name: (request.gpu,) for name in self._eviction_candidates(request)}
        outcomes = self._unload_each(wanted, f"unloaded for {request.worker}", enough=lambda: self._fits(request))
        unloaded = [name for name, ok, _ in outcomes if ok]
        with self._decide:
            return self._grant(request, unloaded) or self._refuse(
                request, unloaded, [f"{name} {detail}" for name, ok, detail in outcomes if not ok])

    def release(self, reservation_id: str) -> Reservation | None:
        reservation = self.ledger.remove(reservation_id)
        if reservation is not None:
            self.ledger.record("release", reservation.worker, reservation.gpu, reservation.gb,
                               f"id {reservation.id}")
        elif not reservation_id.endswith(f".{self.ledger.boot}"):  # issued by an earlier manager process
            with self._decide:
                if self._watch.unheard:  # the census may still see it in a worker's document: never adopt it
                    self._watch.released_unknown.add(reservation_id)
        return reservation

    def _replaced(self, request: ReservationRequest) -> list[Reservation]:
        """What a grant of ``request`` replaces: the worker's reservation of the same label on that GPU."""
        return [r for r in self.ledger.of_worker(request.worker, request.gpu) if r.label == request.label]

    def _fits(self, request: ReservationRequest) -> bool:
        return request.gb <= self.available(request.gpu) + sum(r.gb for r in self._replaced(request))

    def _grant(self, request: ReservationRequest, unloaded: list[str]) -> Decision | None:
        """Under ``_decide``: book ``request`` if it fits now (replacing its previous reservation), else None."""
        if not self._fits(request):
            return None
        replaced = self.ledger.take(
            lambda r: (r.worker, r.gpu, r.label) == (request.worker, request.gpu, request.label)
        )
        if replaced:
            self.ledger.record("replace", request.worker, request.gpu, sum(r.gb for r in replaced),
                               "re-reservation replaces the previous one")
        reservation = self.ledger.add(request.worker, request.gpu, request.gb, request.priority, request.label,
                                      request.instance)
        self._watch.evicted.pop((request.worker, request.gpu), None)
        self._watch.room_since.pop((request.worker, request.gpu), None)
        self.ledger.record("grant", request.worker, request.gpu, request.gb,
                           f"id {reservation.id}" + (f", after unloading {', '.join(unloaded)}" if unloaded else ""))
        return Decision(True, reservation, "", tuple(unloaded))

    def _refuse(self, request: ReservationRequest, unloaded: list[str], notes: list[str]) -> Decision:
        available = self.available(request.gpu) + sum(r.gb for r in self._replaced(request))
        reason = self._refusal(request, available, notes)
        self.ledger.record("refuse", request.worker, request.gpu, request.gb, reason)
        log.warning("refused %s %.1f GB on GPU %d: %s", request.worker, request.gb, request.gpu, reason)
        return Decision(False, None, reason, tuple(unloaded))

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

    def _unload_each(self, targets: Mapping[str, Collection[int]], why: str,
                     enough: Callable[[], bool] = lambda: False, reload: bool = True) -> list[tuple[str, bool, str]]:
        """Ask each target worker in turn to unload, until ``enough()``; on success its reservations on the given
        GPUs go. The calls run outside ``_decide`` (see the module docstring). Returns (worker, ok, detail)."""
        with self._decide:
            claimed = [name for name in targets if name not in self._unloading]
            self._unloading.update(claimed)
        outcomes = [(name, False, BEING_UNLOADED) for name in targets if name not in claimed]
        try:
            for name in claimed:
                if enough():
                    break
                result = self.control.unload(name)
                if result.ok:
                    with self._decide:
                        for gpu in targets[name]:
                            self._evicted(name, gpu, why, reload)
                outcomes.append((name, result.ok, result.detail))
        finally:
            with self._decide:
                self._unloading.difference_update(claimed)
        return outcomes

    def _evicted(self, worker: str, gpu: int, why: str, reload: bool = True) -> None:
        """Under ``_decide``: ``worker`` unloaded: its reservations on ``gpu`` go; a when_possible worker is
        remembered for reload."""
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
        """Sample pressure, hear unheard workers, drop dead instances, reload evicted workers that fit."""
        now = self.clock()
        gpus = gpu_view(self.probe.gpus(), self.ledger, self.settings.safety_margin_gb, self.thresholds())
        self.ledger.pressure.append({"t": round(now, 3), "gpus": [
            {k: g[k] for k in ("index", "free_gb", "reserved_gb", "pressure")} for g in gpus]})
        self.census()
        self.sweep(self.settings.dead_after_checks)
        for worker, gpu in self._reload_candidates(now):
            result = self.control.load(worker)
            self.ledger.record("reload", worker, gpu, self.workers[worker].size_gb,
                               "predictive reload: " + ("asked to load" if result.ok else result.detail))
            if result.ok:
                with self._decide:
                    self._watch.evicted.pop((worker, gpu), None)
                    self._watch.room_since.pop((worker, gpu), None)

    def census(self) -> None:
        """Read the ``/memory/status`` document of each worker not heard from yet (see the module docstring)."""
        for worker in sorted(self._watch.unheard):
            document = self.control.held(worker)
            if document is None:
                continue
            with self._decide:
                self._watch.unheard.discard(worker)
                self._take_back(worker, document)
                if not self._watch.unheard:
                    self._watch.released_unknown.clear()

    def _take_back(self, worker: str, document: Mapping[str, Any]) -> None:
        """Under ``_decide``: adopt what ``worker`` says it holds from an earlier manager; note its eviction."""
        gpu = document.get("gpu")
        if document.get("worker") != worker or not is_index(gpu, len(self.probe.gpus())):
            return
        instance = document.get("instance") if isinstance(document.get("instance"), str) else ""
        entries = document.get("reservations")
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            rid, gb, label = entry.get("id"), entry.get("gb"), entry.get("label")
            if not (isinstance(rid, str) and 0 < len(rid) <= 64 and is_size(gb) and isinstance(label, str)):
                continue
            if (rid.endswith(f".{self.ledger.boot}") or rid in self._watch.released_unknown
                    or self.ledger.get(rid) is not None
                    or any(r.label == label for r in self.ledger.of_worker(worker, gpu))):
                continue  # ours, released meanwhile, already known, or superseded by a newer reservation
            self.ledger.adopt(Reservation(rid, worker, gpu, float(gb), self.workers[worker].priority, label[:64],
                                          instance[:128], round(self.clock(), 3)))
            self.ledger.record("adopt", worker, gpu, float(gb), f"id {rid}, held since before this manager started")
        if (document.get("unloaded") is True and self.workers[worker].residency is Residency.WHEN_POSSIBLE
                and not self.ledger.of_worker(worker, gpu)):
            self._watch.evicted.setdefault((worker, gpu), self.clock())
            self.ledger.record("census", worker, gpu, None, "unloaded before this manager started: reloaded "
                                                            "once it fits")

    def sweep(self, dead_after: int) -> list[Reservation]:
        """Drop the reservations of each instance whose worker's /health has not answered ``dead_after`` checks
        in a row. Instances are those holding reservations *before* the check: one that reserves while the
        check is in flight (a restarted worker) is not counted against."""
        holders: dict[str, set[str]] = {}
        for r in self.ledger.all():
            holders.setdefault(r.worker, set()).add(r.instance)
        dropped: list[Reservation] = []
        for worker, instances in holders.items():
            answered = self.control.alive(worker)
            with self._decide:
                for instance in instances:
                    dropped += self._missed(worker, instance, answered, dead_after)
        with self._decide:
            for key in [k for k in self._watch.misses if k[1] not in holders.get(k[0], ())]:
                del self._watch.misses[key]
        return dropped

    def _missed(self, worker: str, instance: str, answered: bool, dead_after: int) -> list[Reservation]:
        key = (worker, instance)
        if answered:
            self._watch.misses.pop(key, None)
            return []
        misses = self._watch.misses.get(key, 0) + 1
        if misses < dead_after:
            self._watch.misses[key] = misses
            return []
        self._watch.misses.pop(key, None)
        gone = self.ledger.take(lambda r: r.worker == worker and r.instance == instance)
        if gone:
            self.ledger.record("drop", worker, None, sum(r.gb for r in gone),
                               f"/health did not answer {misses} time(s): reservations dropped")
            log.warning("%s: /health not answering: dropped %d reservation(s)", worker, len(gone))
        return gone

    def _reload_candidates(self, now: float) -> list[tuple[str, int]]:
        ready = []
        with self._decide:
            for key in list(self._watch.evicted):
                worker, gpu = key
                if self.ledger.of_worker(worker, gpu):  # it came back by itself
                    self._watch.evicted.pop(key, None)
                    self._watch.room_since.pop(key, None)
                elif worker in self._unloading or self.workers[worker].size_gb > self.available(gpu):
                    self._watch.room_since.pop(key, None)
                elif now - self._watch.room_since.setdefault(key, now) >= self.settings.reload_quiet_seconds:
                    ready.append(key)
        return ready

    # ------------------------------------------------------------------ emergencies
    def free_for(self, worker: str, gpu: int, gb: float) -> dict[str, Any]:
        """Emergency: unload idle workers on ``gpu`` (any residency, least important first) until ``gb`` fits."""
        holders = sorted({r.worker for r in self.ledger.on_gpu(gpu)} - {worker},
                         key=lambda w: -self.workers[w].priority)
        outcomes = self._unload_each({name: (gpu,) for name in holders}, f"emergency request of {worker}",
                                     enough=lambda: gb <= self.available(gpu))
        unloaded = [name for name, ok, _ in outcomes if ok]
        available = self.available(gpu)
        satisfied = gb <= available
        self.ledger.record("emergency", worker, gpu, gb, ("satisfied" if satisfied else "not satisfied")
                           + (f"; unloaded {', '.join(unloaded)}" if unloaded else ""))
        return {"satisfied": satisfied, "available_gb": round(max(0.0, available), 2), "unloaded": unloaded,
                "notes": [f"{name} {detail}" for name, ok, detail in outcomes if not ok]}

    def cleanup(self) -> list[Reservation]:
        """Emergency: drop at once the reservations of every worker whose /health does not answer."""
        dropped = self.sweep(dead_after=1)
        self.ledger.record("emergency", ",".join(sorted({r.worker for r in dropped})) or "-", None,
                           sum(r.gb for r in dropped), f"force_cleanup: {len(dropped)} reservation(s) dropped")
        return dropped

    def unload_all_except(self, keep: set[str], gpu: int | None) -> dict[str, Any]:
        """Emergency: unload every worker not in ``keep`` (on ``gpu`` only, if given). Busy ones answer 409."""
        targets: dict[str, set[int]] = {}
        for worker in sorted(self.workers, key=lambda w: -self.workers[w].priority):
            held = {r.gpu for r in self.ledger.of_worker(worker)}
            if worker not in keep and (gpu is None or gpu in held):
                targets[worker] = held
        outcomes = self._unload_each(targets, "force_unload_all_except", reload=False)
        results = {name: detail for name, _, detail in outcomes}
        self.ledger.record("emergency", ",".join(sorted(keep)) or "-", gpu, None,
                           "force_unload_all_except: " + ", ".join(f"{w} {d}" for w, d in results.items()))
        return {"results": results}

"""Carries out the fault schedule against the running soak and records every fault it injected (or why not).

Instant faults (signals to a worker, a re-push) run on the schedule thread. Faults that last (a Redis pause or
restart, a callback or storage window, the second pod joining or leaving) each hold their resource ("redis",
"callback", "storage", "pod") and run on a thread of their own, so faults of different resources overlap, as
they do in production; a fault whose resource is still busy is skipped and counted as skipped. ``finish``
waits for every running fault and leaves everything as it was: Redis running, every window closed.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from local.redis_server import RedisServer
from local.supabase_standin import SupabaseStandin

from ..faults import Mode, ReplyDelayProxy, SupabaseFront
from .plan import Fault
from .pods import Pod
from .producer import Producer

log = logging.getLogger("soak")

RESOURCES = {"redis_pause": "redis", "redis_restart": "redis", "redis_slow_replies": "redis",
             "callback_refuse": "callback", "callback_hang": "callback", "callback_late": "callback",
             "callback_slow": "callback",
             "storage_500": "storage", "pod_toggle": "pod"}
CALLBACK_MODES = {"callback_refuse": Mode.REFUSE, "callback_hang": Mode.HANG, "callback_late": Mode.LATE,
                  "callback_slow": Mode.SLOW}


@dataclass
class Event:
    """One line of the fault timeline: when (run seconds), what, and what came of it. ``target``: the worker-id
    prefix of the processes it ended (``soak-a-wan-``, or ``soak-b1-`` for a whole pod), and their pids."""
    at: float
    kind: str
    detail: str
    done: bool = True        # False: skipped (resource busy, no such process)
    target: str = ""
    pids: tuple[int, ...] = ()   # the processes it ended


@dataclass
class Injector:
    redis_server: RedisServer
    redis_proxy: ReplyDelayProxy        # the Redis-protocol workers' way to redis-server
    standin: SupabaseStandin
    front: SupabaseFront
    producer: Producer
    pod_a: Pod
    new_pod_b: Callable[[int], Pod]      # n → the n-th second pod (a new RUNPOD_POD_ID each time)
    clock: Callable[[], float]
    redis_lock: threading.Lock
    rng: random.Random                   # choices made at injection time (which busy worker)
    events: list[Event] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)     # every pod ever started, for the logs and teardown

    def __post_init__(self) -> None:
        self._busy: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.pod_b: Pod | None = None
        self.pods.append(self.pod_a)

    # ------------------------------------------------------------------ the schedule
    def run(self, faults: list[Fault], stop: threading.Event) -> None:
        for fault in faults:
            if stop.wait(max(0.0, fault.at - self.clock())):
                return
            self.inject(fault)

    def inject(self, fault: Fault) -> None:
        resource = RESOURCES.get(fault.kind)
        if resource is None:
            self._instant(fault)
            return
        with self._lock:
            busy = resource in self._busy
            self._busy.add(resource)
        if busy:
            self._record(fault.kind, f"skipped: {resource} still busy ({fault.describe()})", done=False)
            return
        thread = threading.Thread(target=self._lasting, args=(fault, resource), name=f"soak-{fault.kind}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def finish(self, timeout: float = 240.0) -> None:
        """Wait for every lasting fault to end (each restores what it changed)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self.front.set_mode(Mode.PASS)
        self.standin.set_storage_failing(None)
        self.redis_proxy.release()
        if not self.redis_server.running:
            self.redis_server.start()

    def counts(self) -> Counter:
        return Counter(e.kind for e in self.events if e.done)

    def skipped(self) -> Counter:
        return Counter(e.kind for e in self.events if not e.done)

    def log_files(self) -> list[Path]:
        return [f for pod in self.pods for f in pod.log_files()]

    # ------------------------------------------------------------------ instant faults
    def _instant(self, fault: Fault) -> None:
        if fault.kind == "producer_repush":
            job = self.producer.repush()
            self._record(fault.kind, f"re-pushed {job.id}" if job else "skipped: nothing pushed yet", job is not None)
            return
        pod = self.pod_b if fault.params["pod"] == "b" and self.pod_b is not None and self.pod_b.up else self.pod_a
        kind = fault.params["kind"]
        where = f"{pod.name}/{kind} ({pod.transport(kind)})"
        if fault.kind == "worker_cold_stop":
            pids = pod.signal_group(kind, signal.SIGINT)
            what = f"SIGINT to the process group of {where}, pids {pids}"
        elif fault.params["target"] == "process":
            pids = pod.kill_worker_process(kind)
            what = f"SIGKILL of the gunicorn worker process of {where}, pid {pids}"
        else:
            pids = pod.signal_group(kind, signal.SIGKILL)
            what = f"SIGKILL of the process group of {where}, pids {pids}"
        self._record(fault.kind, what if pids else f"skipped: {where} not running", bool(pids),
                     f"{pod.name}-{kind}-" if pids else "", pids)

    # ------------------------------------------------------------------ lasting faults
    def _lasting(self, fault: Fault, resource: str) -> None:
        try:
            getattr(self, f"_{resource}")(fault)
        except Exception as exc:  # a fault that could not be carried out is reported, never hidden
            log.exception("soak: %s failed", fault.kind)
            self._record(fault.kind, f"FAILED to inject: {type(exc).__name__}: {exc}", done=False)
        finally:
            with self._lock:
                self._busy.discard(resource)

    def _redis(self, fault: Fault) -> None:
        server = self.redis_server
        if fault.kind == "redis_slow_replies":
            seconds = fault.params["seconds"]
            self._record(fault.kind, f"replies to the Redis-protocol workers held for {seconds:.1f} s")
            self.redis_proxy.hold(seconds)
            time.sleep(seconds)
            return
        if fault.kind == "redis_pause":
            seconds = fault.params["seconds"]
            pid = server.pid
            self._record(fault.kind, f"SIGSTOP redis-server (pid {pid}) for {seconds:.1f} s")
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)
            finally:
                os.kill(pid, signal.SIGCONT)
            return
        down = fault.params["down_seconds"]
        with self.redis_lock:  # no push straddles the restart (see producer.py)
            self._record(fault.kind, f"SIGKILL redis-server, restart on the same AOF after {down:.1f} s")
            server.kill()
            time.sleep(down)
            server.start()
            self.producer.client.connection_pool.disconnect()

    def _callback(self, fault: Fault) -> None:
        """A callback outage; with ``cold_stop_after``, a worker busy at that moment in the window (most likely
        inside its callback delivery) gets the cold stop: the orchestrator's grace running out mid-outage."""
        seconds, stop_after = fault.params["seconds"], fault.params.get("cold_stop_after")
        mode, delay = CALLBACK_MODES[fault.kind], fault.params.get("delay", 0.0)
        self._record(fault.kind, f"job-callback {mode.value} for {seconds:.1f} s"
                     + (f", each call {delay:.1f} s" if delay else "")
                     + (f", cold stop of a busy worker after {stop_after:.1f} s" if stop_after else ""))
        self.front.set_mode(mode, delay)
        try:
            if stop_after:
                time.sleep(stop_after)
                self._cold_stop_a_busy_worker()
                time.sleep(seconds - stop_after)
            else:
                time.sleep(seconds)
        finally:
            self.front.set_mode(Mode.PASS)

    def _cold_stop_a_busy_worker(self) -> None:
        """Prefer a worker that POSTed a terminal callback in the last seconds (it is inside its delivery, the
        window of review findings #1 and #7); else any busy one."""
        busy = [(pod, kind) for pod in (self.pod_a, self.pod_b) if pod is not None and pod.up
                for kind in pod.busy_kinds()]
        senders = self.front.terminal_senders(within=3.0)
        delivering = [(pod, kind) for pod, kind in busy if any(w.startswith(f"{pod.name}-{kind}") for w in senders)]
        if not busy:
            self._record("worker_cold_stop", "skipped: no worker busy in the callback outage", done=False)
            return
        pod, kind = self.rng.choice(delivering or busy)
        pids = pod.signal_group(kind, signal.SIGINT)
        self._record("worker_cold_stop", f"SIGINT to the process group of {pod.name}/{kind} ({pod.transport(kind)}), "
                     f"{'inside its callback delivery' if delivering else 'busy'} in the outage, pids {pids}",
                     bool(pids), f"{pod.name}-{kind}-" if pids else "", pids)

    def _storage(self, fault: Fault) -> None:
        seconds = fault.params["seconds"]
        self._record(fault.kind, f"storage uploads answer 500 for {seconds:.1f} s")
        self.standin.set_storage_failing(500)
        try:
            time.sleep(seconds)
        finally:
            self.standin.set_storage_failing(None)

    def _pod(self, fault: Fault) -> None:
        if self.pod_b is not None and self.pod_b.up:
            pod = self.pod_b
            pids = tuple(pod.pids())
            self._record(fault.kind, f"pod {pod.name} leaves (SIGTERM to its orchestrator: a pod drain)",
                         target=f"{pod.name}-", pids=pids)
            code = pod.stop()
            self._record("pod_left", f"pod {pod.name} gone (orchestrator exit {code})", target=f"{pod.name}-",
                         pids=pids)
            return
        pod = self.new_pod_b(len(self.pods))
        self.pods.append(pod)
        self.pod_b = pod
        self._record(fault.kind, f"pod {pod.name} joins (workers over REST: {', '.join(sorted(pod.rest_kinds))})")
        pod.start()
        self._record("pod_joined", f"pod {pod.name} running")

    def _record(self, kind: str, detail: str, done: bool = True, target: str = "",
                pids: Iterable[int] = ()) -> None:
        event = Event(round(self.clock(), 2), kind, detail, done, target, tuple(pids))
        with self._lock:
            self.events.append(event)
        log.info("soak fault at %.1f s: %s: %s", event.at, kind, detail)

"""The soak's settings and its seeded fault schedule.

Everything random in a soak run comes from one seed (``SOAK_SEED``, random when unset, always printed): the
fault schedule is drawn here up front, the job stream and the Upstash front's faults from generators seeded
from it. The same seed gives the same schedule; the fleet's own timing still varies from run to run, which
is why the invariants, not the exact outcome, are what a run is judged on.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.settings import Reader

#: Every fault the injector knows, with its weight in the schedule. Windows and pauses carry a duration.
FAULT_WEIGHTS = {
    "worker_sigkill": 4,     # SIGKILL of one worker: its gunicorn worker process alone, or the whole group
    "worker_cold_stop": 2,   # SIGINT to one worker's process group (the orchestrator's cold stop)
    "redis_pause": 2,        # SIGSTOP redis-server longer than the clients' timeout, then SIGCONT
    "redis_restart": 1,      # SIGKILL redis-server, then start it again on the same append-only file
    "redis_slow_replies": 2,  # replies to the Redis-protocol workers held past their timeout (commands run)
    "callback_refuse": 2,    # job-callback answers 503 for a while
    "callback_hang": 1,      # job-callback never answers (nothing reaches the app) for a while
    "callback_late": 1,      # job-callback reaches the app, the answer is held past the caller's timeout
    "callback_slow": 1,      # job-callback answers each call only after 1-1.8 s (inside the caller's 2 s)
    "storage_500": 2,        # Supabase Storage answers 500 to every upload for a while
    "pod_toggle": 1,         # the second pod (own RUNPOD_POD_ID, same Redis and Supabase) joins or leaves
    "producer_repush": 1,    # the producer pushes a job it already pushed (a retried RPUSH)
}
WINDOW_SECONDS = {"callback_refuse": (2.0, 12.0), "callback_hang": (2.0, 8.0), "callback_late": (2.0, 6.0),
                  "callback_slow": (4.0, 15.0), "storage_500": (1.0, 8.0)}
KINDS = ("sdxl", "chat", "wan")


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 3.0
    seed: int = 0
    jobs_per_second: float = 1.5
    fault_interval_seconds: float = 6.0
    rest_fault_rate: float = 0.01
    out_dir: Path = Path("var/soak")
    seed_was_given: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_minutes: float = 1.5) -> SoakConfig:
        """``SOAK_MINUTES``, ``SOAK_SEED``, ``SOAK_JOBS_PER_SECOND``, ``SOAK_FAULT_INTERVAL_SECONDS``,
        ``SOAK_REST_FAULT_RATE``, ``SOAK_OUT``: each bounded; a bad value is one ``ConfigError`` line."""
        r = Reader(env)
        given = r.raw("SOAK_SEED")
        seed = (int(r.number("SOAK_SEED", 0, 0, 2**32 - 1)) if given is not None
                else random.SystemRandom().randrange(2**32))
        return cls(minutes=r.number("SOAK_MINUTES", default_minutes, 0.2, 1440),
                   seed=seed,
                   jobs_per_second=r.number("SOAK_JOBS_PER_SECOND", 1.5, 0.1, 20),
                   fault_interval_seconds=r.number("SOAK_FAULT_INTERVAL_SECONDS", 6.0, 0.5, 600),
                   rest_fault_rate=r.number("SOAK_REST_FAULT_RATE", 0.01, 0, 0.3),
                   out_dir=r.path("SOAK_OUT") or Path("var/soak"),
                   seed_was_given=given is not None)

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    def rng(self, purpose: str) -> random.Random:
        """An independent generator per purpose (schedule, jobs, REST faults), all from the one seed."""
        return random.Random(f"{self.seed}:{purpose}")


@dataclass(frozen=True)
class Fault:
    at: float                      # seconds after the start of the run
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        details = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind} {details}".strip()


def schedule(config: SoakConfig, redis_client_timeout: float) -> list[Fault]:
    """The run's faults, at exponentially distributed intervals (mean ``fault_interval_seconds``), from 8 s
    after the start until 10 s before the end (the fleet starts calm and the last fault has time to end).
    The first pod toggle comes in the first third of the run, so even a short run sees the second pod."""
    rng = config.rng("schedule")
    kinds, weights = zip(*FAULT_WEIGHTS.items())
    faults: list[Fault] = []
    t, end = 8.0, config.seconds - 10.0
    while True:
        t += rng.expovariate(1.0 / config.fault_interval_seconds)
        if t >= end:
            break
        kind = rng.choices(kinds, weights)[0]
        faults.append(Fault(t, kind, _params(kind, rng, redis_client_timeout)))
    first_toggle = Fault(rng.uniform(8.0, max(9.0, config.seconds / 3)), "pod_toggle")
    if not any(f.kind == "pod_toggle" and f.at <= first_toggle.at for f in faults):
        faults.append(first_toggle)
    return sorted(faults, key=lambda f: f.at)


def _params(kind: str, rng: random.Random, redis_client_timeout: float) -> dict[str, Any]:
    if kind in ("worker_sigkill", "worker_cold_stop"):
        params: dict[str, Any] = {"kind": rng.choice(KINDS), "pod": rng.choice(("a", "b"))}
        if kind == "worker_sigkill":
            params["target"] = rng.choice(("process", "group"))
        return params
    if kind in ("redis_pause", "redis_slow_replies"):
        return {"seconds": rng.uniform(1.5, 3.0) * redis_client_timeout}
    if kind == "redis_restart":
        return {"down_seconds": rng.uniform(0.5, 3.0)}
    if kind in WINDOW_SECONDS:
        params = {"seconds": rng.uniform(*WINDOW_SECONDS[kind])}
        if kind == "callback_slow":
            params["delay"] = rng.uniform(1.0, 1.8)
        elif kind.startswith("callback_") and rng.random() < 0.5:
            params["cold_stop_after"] = rng.uniform(0.4, 0.8) * params["seconds"]
        return params
    return {}

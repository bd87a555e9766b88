"""Registration's settings (``RegistrationSettings.from_env(os.environ)``), parsed once in ``main``: only the
variables this process reads, so a bad value of a worker's setting never stops it.

Every variable is documented in README.md ("Settings"). The Supabase, pod and serving fields keep the names
they have in the fleet's shared settings groups (``common.settings``), so the two read alike.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.settings import Reader, Secret
from common.topology import Topology


@dataclass(frozen=True)
class RegistrationSettings:
    topology: Topology = field(default_factory=Topology)
    supabase_url: str | None = None               # SUPABASE_URL
    supabase_service_key: Secret | None = None    # SUPABASE_SERVICE_KEY (alias SUPABASE_SERVICE_ROLE_KEY)
    runpod_pod_id: str | None = None              # RUNPOD_POD_ID
    public_base_url: str | None = None            # PUBLIC_BASE_URL
    http_read_timeout_seconds: float = 10.0       # HTTP_READ_TIMEOUT_SECONDS: its own /health server
    interval_seconds: float = 300.0     # REGISTRATION_INTERVAL_SECONDS: the heartbeat; 0 = none
    retry_max_seconds: float = 60.0     # REGISTRATION_RETRY_MAX_SECONDS: cap of the retry backoff
    health_poll_seconds: float = 5.0    # REGISTRATION_HEALTH_POLL_SECONDS: how often each service's /health is read

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RegistrationSettings:
        r = Reader(env)
        return cls(
            topology=Topology.from_env(env),
            supabase_url=r.url("SUPABASE_URL"),
            supabase_service_key=r.secret("SUPABASE_SERVICE_KEY") or r.secret("SUPABASE_SERVICE_ROLE_KEY"),
            runpod_pod_id=r.identifier("RUNPOD_POD_ID"),
            public_base_url=r.url("PUBLIC_BASE_URL"),
            http_read_timeout_seconds=r.number("HTTP_READ_TIMEOUT_SECONDS", 10.0, 0.5, 600),
            interval_seconds=r.number("REGISTRATION_INTERVAL_SECONDS", 300.0, 0, 86400),
            retry_max_seconds=r.number("REGISTRATION_RETRY_MAX_SECONDS", 60.0, 0.01, 3600),
            health_poll_seconds=r.number("REGISTRATION_HEALTH_POLL_SECONDS", 5.0, 0.05, 600),
        )

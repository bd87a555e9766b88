"""Registration's settings (``RegistrationSettings.from_env(os.environ)``), parsed once in ``main``: only the
variables this process reads, so a bad value of a worker's setting never stops it.

The Supabase, pod, public-address and serving groups are the fleet's shared ones (``common.settings``), the
services' ports ``common.topology``'s. README.md's "Settings" tables are generated from these declarations.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.declare import var
from common.parsers import number
from common.settings import Logs, Pod, PublicAddress, Serving, SupabaseAccess
from common.topology import Topology


@dataclass(frozen=True)
class RegistrationSettings(Topology, SupabaseAccess, Pod, PublicAddress, Serving, Logs):
    """Registration"""

    interval_seconds: float = var("REGISTRATION_INTERVAL_SECONDS", number(0, 86400), 300.0,
                                  "re-registration heartbeat; 0 = once (and again after a restart)")
    retry_max_seconds: float = var("REGISTRATION_RETRY_MAX_SECONDS", number(0.01, 3600), 60.0,
                                   "cap of the retry backoff")
    health_poll_seconds: float = var("REGISTRATION_HEALTH_POLL_SECONDS", number(0.05, 600), 5.0,
                                     "how often registration reads chat's and the router's `/health` (waiting "
                                     "for the first 200; between heartbeats, to notice a restart)")

"""The registrations this pod owes the app: the chat worker and the router, one loop each.

Nothing is ever sent when the public URL cannot be known (no ``PUBLIC_BASE_URL``, not on RunPod) or Supabase
is not set: then there are no loops, and :meth:`Registrations.health` still answers ready, saying why it is
idle, so the process stays up and ``python -m orchestrator status`` shows it RUNNING rather than crashing in
a loop. Each loop finds out by itself, from the service's ``/health``, when the service is ready or restarted.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import requests

from .client import Registrar, Service
from .config import RegistrationSettings
from .heartbeat import RegistrationLoop
from .url import public_url

log = logging.getLogger("registration")


def why_disabled(settings: RegistrationSettings) -> str | None:
    """Why nothing may be registered, or None when registration is on."""
    if not settings.public_base_url and not settings.runpod_pod_id:
        return "neither PUBLIC_BASE_URL nor RUNPOD_POD_ID is set (the public URL cannot be known)"
    if not settings.supabase_url or settings.supabase_service_key is None:
        return "SUPABASE_URL or SUPABASE_SERVICE_KEY is not set"
    return None


class Registrations:
    def __init__(self, settings: RegistrationSettings, ports: Mapping[Service, int], *, healthy: Callable[[str], bool],
                 interval: float, retry_max: float, retry_base: float = 2.0, health_poll: float = 5.0,
                 session: requests.Session | None = None):
        self.disabled_reason = why_disabled(settings)
        self._loops: dict[Service, RegistrationLoop] = {}
        if self.disabled_reason:
            return
        assert settings.supabase_url is not None and settings.supabase_service_key is not None
        registrar = Registrar(settings.supabase_url, settings.supabase_service_key, session)
        for service, port in ports.items():
            url = public_url(settings, port)
            assert url is not None
            self._loops[service] = RegistrationLoop(
                service, url, f"http://127.0.0.1:{port}/health", registrar, healthy=healthy, interval=interval,
                health_poll=health_poll, retry_base=retry_base, retry_max=retry_max)

    def start(self) -> None:
        if self.disabled_reason:
            log.warning("registration off: %s; nothing is sent, /health answers 200", self.disabled_reason)
        for loop in self._loops.values():
            log.info("%s: registering %s as soon as %s answers 200", loop.service.value, loop.url.url,
                     loop.local_health_url)
            loop.start()

    def loop(self, service: Service) -> RegistrationLoop | None:
        return self._loops.get(service)

    def stop(self) -> None:
        for loop in self._loops.values():
            loop.stop()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready while every loop runs (a dead loop would register nothing again: let the supervisor restart)."""
        if self.disabled_reason:
            return True, {"registering": False, "reason": self.disabled_reason}
        services = {service.value: loop.describe() for service, loop in self._loops.items()}
        return all(loop.alive for loop in self._loops.values()), {"registering": True, "services": services}

"""The registrations the orchestrator runs: chat and the router, each once its program is RUNNING.

``on_running(program)`` starts that service's :class:`RegistrationLoop` the first time and kicks it (register
again now) after a restart; ``stop()`` ends every heartbeat (the orchestrator's SIGTERM). Nothing is ever
sent when the public URL cannot be known (no ``PUBLIC_BASE_URL``, not on RunPod) or Supabase is not set.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import requests

from common.settings import Settings

from .client import Registrar, Service
from .heartbeat import RegistrationLoop
from .url import public_url

log = logging.getLogger("registration")


class Registrations:
    def __init__(self, settings: Settings, ports: Mapping[Service, int], *, healthy: Callable[[str], bool],
                 interval: float, retry_max: float, retry_base: float = 2.0,
                 session: requests.Session | None = None):
        self._ports = dict(ports)
        self._healthy = healthy
        self._interval = interval
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._loops: dict[Service, RegistrationLoop] = {}
        self._settings = settings
        self._registrar: Registrar | None = None
        self.disabled_reason = self._why_disabled(settings)
        if self.disabled_reason:
            log.warning("registration off: %s", self.disabled_reason)
        else:
            assert settings.supabase_url is not None and settings.supabase_service_key is not None
            self._registrar = Registrar(settings.supabase_url, settings.supabase_service_key, session)

    @staticmethod
    def _why_disabled(settings: Settings) -> str | None:
        if not settings.public_base_url and not settings.runpod_pod_id:
            return "neither PUBLIC_BASE_URL nor RUNPOD_POD_ID is set (the public URL cannot be known)"
        if not settings.supabase_url or settings.supabase_service_key is None:
            return "SUPABASE_URL or SUPABASE_SERVICE_KEY is not set"
        return None

    def on_running(self, program: str) -> None:
        try:
            service = Service(program)
        except ValueError:
            return
        if self._registrar is None or service not in self._ports:
            return
        loop = self._loops.get(service)
        if loop is not None:
            loop.kick("restart")
            return
        port = self._ports[service]
        url = public_url(self._settings, port)
        assert url is not None
        loop = RegistrationLoop(service, url, f"http://127.0.0.1:{port}/health", self._registrar,
                                healthy=self._healthy, interval=self._interval, retry_base=self._retry_base,
                                retry_max=self._retry_max)
        self._loops[service] = loop
        log.info("%s: registering %s as soon as its /health answers 200", service.value, url.url)
        loop.start()

    def loop(self, service: Service) -> RegistrationLoop | None:
        return self._loops.get(service)

    def stop(self) -> None:
        for loop in self._loops.values():
            loop.stop()

"""One registration thread per service: wait for local health, register, retry with backoff, re-register.

- Registers only while the service's local ``/health`` answers 200 (the app's function health-checks the
  public URL and refuses otherwise).
- A failed attempt is retried after 2, 4, 8 … seconds (capped by ``retry_max``).
- After a success it re-registers every ``interval`` seconds (the heartbeat; 0 = only once), and at once when
  :meth:`RegistrationLoop.kick` says the service restarted.
- :meth:`RegistrationLoop.stop` (the orchestrator's SIGTERM) ends the heartbeat. The app has no call to
  mark a worker gone, so stopping the heartbeat is all there is to do.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .client import Registrar, Service
from .url import PublicUrl

log = logging.getLogger("registration")


class RegistrationLoop:
    def __init__(self, service: Service, url: PublicUrl, local_health_url: str, registrar: Registrar, *,
                 healthy: Callable[[str], bool], interval: float, retry_base: float = 2.0,
                 retry_max: float = 60.0):
        self.service = service
        self.url = url
        self.local_health_url = local_health_url
        self._registrar = registrar
        self._healthy = healthy
        self.interval = interval
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._method = "startup"
        self.registrations = 0  # successful ones
        self._thread = threading.Thread(target=self._run, name=f"register-{service.value}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self, method: str = "restart") -> None:
        """Register again now (the service restarted)."""
        self._method = method
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _sleep(self, seconds: float | None) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            if not self._healthy(self.local_health_url):
                failures += 1
                self._sleep(self._retry_delay(failures))
                continue
            outcome = self._registrar.register(self.service, self.url, self._method)
            if self._stopped.is_set():
                return
            if outcome.ok:
                self.registrations += 1
                log.info("%s: %s (%s)", self.service.value, outcome.detail, self._method)
                failures = 0
                self._method = "heartbeat"
                self._sleep(self.interval if self.interval > 0 else None)
            else:
                failures += 1
                delay = self._retry_delay(failures)
                log.warning("%s: registration failed: %s; retry in %.0f s", self.service.value, outcome.detail,
                            delay)
                self._sleep(delay)

    def _retry_delay(self, failures: int) -> float:
        return min(self.retry_max, self.retry_base * 2 ** max(0, failures - 1))

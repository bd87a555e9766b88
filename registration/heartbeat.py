"""One registration thread per service: wait for local health, register, retry with backoff, re-register.

- Registers only while the service's local ``/health`` answers 200 (the app's function health-checks the
  public URL and refuses otherwise); until then ``/health`` is polled every ``health_poll`` seconds.
- A failed attempt is retried after 2, 4, 8 … seconds (capped by ``retry_max``).
- After a success it re-registers every ``interval`` seconds (the heartbeat; 0 = no heartbeat) and keeps
  polling ``/health`` in between: once it has stopped answering 200 and answers again, the service restarted
  (or came back from an outage), and it registers again at once with method ``restart``. This process runs
  apart from the supervisor, so health is the only way it can tell.
- :meth:`RegistrationLoop.stop` (SIGTERM) ends the heartbeat. The app has no call to mark a worker gone, so
  stopping the heartbeat is all there is to do.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .client import Registrar, Service
from .url import PublicUrl

log = logging.getLogger("registration")


class RegistrationLoop:
    def __init__(self, service: Service, url: PublicUrl, local_health_url: str, registrar: Registrar, *,
                 healthy: Callable[[str], bool], interval: float, health_poll: float = 5.0,
                 retry_base: float = 2.0, retry_max: float = 60.0):
        self.service = service
        self.url = url
        self.local_health_url = local_health_url
        self._registrar = registrar
        self._healthy = healthy
        self.interval = interval
        self.health_poll = health_poll
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._stopped = threading.Event()
        self._method = "startup"
        self.registrations = 0  # successful ones
        self.last = f"waiting for {local_health_url} to answer 200"
        self._thread = threading.Thread(target=self._guarded, name=f"register-{service.value}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the loop runs or was stopped on purpose (one that died makes ``/health`` fail: restart us)."""
        return self._thread.is_alive() or self._stopped.is_set()

    def describe(self) -> dict[str, Any]:
        """What ``/health`` shows of this service: safe to show (no key, no local path)."""
        return {"url": self.url.url, "registrations": self.registrations, "last": self.last}

    def _guarded(self) -> None:
        try:
            self._run()
        except Exception:  # noqa: BLE001 - said once, then /health answers 503 and the supervisor restarts us
            log.exception("%s: the registration loop failed", self.service.value)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            if not self._healthy(self.local_health_url):
                self._went_down()
                self._stopped.wait(self.health_poll)
                continue
            outcome = self._registrar.register(self.service, self.url, self._method)
            if self._stopped.is_set():
                return
            self.last = outcome.detail
            if not outcome.ok:
                failures += 1
                delay = self._retry_delay(failures)
                log.warning("%s: registration failed: %s; retry in %.0f s", self.service.value, outcome.detail,
                            delay)
                self._stopped.wait(delay)
                continue
            failures = 0
            self.registrations += 1
            log.info("%s: %s (%s)", self.service.value, outcome.detail, self._method)
            self._method = "heartbeat"
            self._watch_until_due()

    def _watch_until_due(self) -> None:
        """Poll ``/health`` until the next heartbeat is due; return early when it fails (an outage)."""
        due = time.monotonic() + self.interval if self.interval > 0 else None
        while not self._stopped.is_set():
            left = None if due is None else due - time.monotonic()
            if left is not None and left <= 0:
                return
            if self._stopped.wait(self.health_poll if left is None else min(self.health_poll, left)):
                return
            if not self._healthy(self.local_health_url):
                self._went_down()
                return

    def _went_down(self) -> None:
        """After a registration, a failed ``/health`` means the next one is a ``restart``."""
        if self.registrations and self._method != "restart":
            log.warning("%s: %s stopped answering 200: registering again (restart) once it is back",
                        self.service.value, self.local_health_url)
            self._method = "restart"
            self.last = f"waiting for {self.local_health_url} to answer 200 again"

    def _retry_delay(self, failures: int) -> float:
        return min(self.retry_max, self.retry_base * 2 ** max(0, failures - 1))

"""The two registration calls to the app's Supabase edge functions (CONTRACT §6).

- chat:   ``POST {SUPABASE_URL}/functions/v1/register-chat-worker``
          ``{"worker_url": <chat URL>, "auto_registered": true}``
- router: ``POST {SUPABASE_URL}/functions/v1/update-worker-url``
          ``{"worker_url": <router URL>, "auto_registered": true, "registration_method", "detection_method"}``

Both with ``Authorization: Bearer <service key>`` and ``apikey: <service key>``. Success = HTTP 200 with
``"success": true``; anything else is a failure the caller retries. The key never reaches a log.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import requests

from common.settings import Secret

from .url import PublicUrl

log = logging.getLogger("registration")


class Service(StrEnum):
    """A service the app knows by URL, and the edge function that records it."""

    CHAT = "chat"
    ROUTER = "router"

    @property
    def function(self) -> str:
        return "register-chat-worker" if self is Service.CHAT else "update-worker-url"

    def body(self, url: PublicUrl, method: str) -> dict[str, Any]:
        body: dict[str, Any] = {"worker_url": url.url, "auto_registered": True}
        if self is Service.ROUTER:
            body.update(registration_method=method, detection_method=url.detection_method)
        return body


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str  # short and safe to log: status code and the function's error text, never the key


class Registrar:
    def __init__(self, supabase_url: str, service_key: Secret, session: requests.Session | None = None,
                 timeout: float = 15.0):
        self.endpoint = supabase_url.rstrip("/") + "/functions/v1/"
        self._key = service_key
        self._session = session or requests.Session()
        self._timeout = timeout

    def register(self, service: Service, url: PublicUrl, method: str) -> Outcome:
        """One attempt. ``method`` is the ``registration_method`` (``startup``, ``heartbeat``, ``restart``)."""
        headers = {"Authorization": f"Bearer {self._key.reveal()}", "apikey": self._key.reveal(),
                   "Content-Type": "application/json"}
        try:
            response = self._session.post(self.endpoint + service.function, json=service.body(url, method),
                                          headers=headers, timeout=self._timeout)
        except requests.RequestException as exc:
            return Outcome(False, f"{service.function}: no answer ({type(exc).__name__})")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code == 200 and isinstance(answer, dict) and answer.get("success") is True:
            return Outcome(True, f"{service.function}: registered {url.url}")
        error = answer.get("error") if isinstance(answer, dict) else None
        return Outcome(False, f"{service.function}: HTTP {response.status_code}"
                              + (f" ({str(error)[:200]})" if error else ""))

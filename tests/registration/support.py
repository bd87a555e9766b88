"""A local service whose ``/health`` the tests switch between 200 and 503, and waiting for registrations."""
from __future__ import annotations

import json

from local.net import BackgroundServer
from local.supabase_standin import SupabaseStandin


class FakeService:
    """A loopback service whose /health says 503 until ``ready`` is set (and again whenever it is cleared)."""

    def __init__(self) -> None:
        self.ready = False
        self.server = BackgroundServer(self.app)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"

    def app(self, environ, start_response):
        start_response("200 OK" if self.ready else "503 Service Unavailable", [("Content-Type", "application/json")])
        return [json.dumps({"status": "healthy" if self.ready else "loading"}).encode()]


def methods(standin: SupabaseStandin) -> list[str]:
    """The router's ``registration_method`` of each accepted registration, in order."""
    return [r.body["registration_method"] for r in standin.registrations
            if r.function == "update-worker-url" and r.accepted]

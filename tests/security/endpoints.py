"""Every HTTP endpoint of a fleet, derived from the OpenAPI route table (``common.openapi``) plus the
memory manager's routes, each with a request that succeeds once authorised and the status it then gets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import openapi

TINY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
#: A body per request schema that passes validation (small, so generation takes milliseconds).
GOOD_BODIES: dict[str, Any] = {
    "ChatRequest": TINY,
    "EnhanceRequest": {"prompt": "a cat", "max_tokens": 2},
    "GenerateRequest": {"inputs": "hello", "parameters": {"max_new_tokens": 2}},
    "OpenAIChatRequest": TINY,
    "WanEnhanceRequest": {"prompt": "a cat on a roof"},
    # Control routes: authorised callers get past the key check and are stopped by the bad `which` (400), so
    # the matrix never unloads a model under the other tests.
    "Which": {"which": 5},
}
OK_STATUS = {"Which": 400}


@dataclass(frozen=True)
class Endpoint:
    program: str        # the fleet program that serves it (router, chat, wan, sdxl, memory_manager)
    method: str
    path: str
    auth: str           # open | client | admin
    body: Any = None
    ok: int = 200       # the status once authorised
    schema: str | None = None  # the request schema's name in common.openapi.SCHEMAS

    @property
    def label(self) -> str:
        return f"{self.program}:{self.method} {self.path}"


def _from_ops(program: str, ops: tuple[openapi.Op, ...]) -> list[Endpoint]:
    return [Endpoint(program, op.method, op.path, op.auth, GOOD_BODIES.get(op.body) if op.body else None,
                     OK_STATUS.get(op.body or "", 200), op.body) for op in ops]


MEMORY_MANAGER = [
    Endpoint("memory_manager", "GET", "/health", "open"),
    Endpoint("memory_manager", "GET", "/live", "open"),
    Endpoint("memory_manager", "GET", "/metrics", "open"),
    Endpoint("memory_manager", "GET", "/memory/status", "open"),
    Endpoint("memory_manager", "GET", "/memory/report", "open"),
    Endpoint("memory_manager", "POST", "/reservations", "admin", {"worker": "no-such-worker"}, 400),
    Endpoint("memory_manager", "DELETE", "/reservations/no-such-id", "admin", None, 404),
    Endpoint("memory_manager", "POST", "/emergency/operation", "admin", {"operation": "status"}, 200),
]


def all_endpoints() -> list[Endpoint]:
    return (_from_ops("router", openapi.router_ops()) + _from_ops("chat", openapi.worker_ops("chat"))
            + _from_ops("wan", openapi.worker_ops("wan")) + _from_ops("sdxl", openapi.worker_ops("sdxl"))
            + MEMORY_MANAGER)

"""Chat's models loaded on demand: after an eviction, and ``qwen_base`` at its first use.

The memory manager frees chat's GPU memory for on-demand work with ``/memory/unload`` (the service then marks
itself ``unloaded``). Its own reload waits for the on-demand workers to go quiet, which a WAN backlog can
postpone indefinitely; meanwhile every /chat, /enhance and /v1/* call would answer 503 "no chat model is
loaded". Instead, the next request that needs a model reloads it: the routes (api.py) call the worker's
``Residency.reload_for_request`` (workers/core/residency.py: reserve with the memory manager first, then load,
under the GPU lock so it never races a job or an unload), waiting at most ``CHAT_RELOAD_WAIT_SECONDS`` for that
lock. A lock still held, or a reservation the manager refuses, is a 503 with Retry-After; concurrent requests
wait for the first one's reload.

``qwen_base`` loads at its first request unless preloaded (``LazyLoads``): it reserves its own memory first
(label ``qwen_base``, sized by ``memory.reservation_gb``: weights + its KV cache + a prefill), and releases it
when it is unloaded. A refusal leaves it unloaded; the request is then served by the other loaded model.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from workers.core.memory_client import MemoryClient, ReserveResult

from .models import LoadedModel, ModelName, ModelStore, ModelUnavailable


class LazyLoads:
    """First-use loads, each under a reservation of its own with the service's memory client (``memory``: set
    when the routes are created (api.py); None without a worker service, e.g. a bench: then nothing is reserved)."""

    def __init__(self, store: ModelStore, size_gb: Callable[[ModelName], float]):
        self.store = store
        self.size_gb = size_gb
        self.memory: MemoryClient | None = None
        self._grants: dict[ModelName, ReserveResult | None] = {}
        self._lock = threading.Lock()   # one reservation per model, even for concurrent first requests

    def load(self, name: ModelName) -> LoadedModel:
        """``name`` loaded, after reserving for it; ``ModelUnavailable`` when refused or the load fails."""
        with self._lock:
            loaded = self.store.get(name)
            if loaded is not None:
                return loaded
            grant = self.memory.reserve(gb=self.size_gb(name), label=name.value) if self.memory else None
            if grant is not None and not grant.may_load:
                raise ModelUnavailable(f"no GPU memory for {name.value}: {grant.reason}")
            try:
                loaded = self.store.load(name)
            except ModelUnavailable:
                self._release(grant)
                raise
            self._grants[name] = grant
            return loaded

    def unloaded(self, name: ModelName) -> None:
        """``name`` was unloaded: give its reservation back, if it had one of its own."""
        with self._lock:
            self._release(self._grants.pop(name, None))

    def _release(self, grant: ReserveResult | None) -> None:
        if grant is not None and self.memory is not None:
            self.memory.release(grant)

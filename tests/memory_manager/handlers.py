"""The fast fake handler (tests/fakes) under the names of the real kinds, so that a real ``python -m workers``
process reserves GPU memory as ``chat`` or ``wan`` (``--handler tests.memory_manager.handlers:create_chat``)."""
from __future__ import annotations

from common.settings import Settings
from tests.fakes.handlers import FakeHandler
from workers.core.job import Queue


def _named(kind: str, queue: Queue) -> FakeHandler:
    handler = FakeHandler(queue)
    handler.kind = kind
    return handler


def create_chat(settings: Settings) -> FakeHandler:
    return _named("chat", Queue.CHAT)


def create_wan(settings: Settings) -> FakeHandler:
    return _named("wan", Queue.WAN)

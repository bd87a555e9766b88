"""A chat worker whose decode steps are slowed (tests only): ``python -m workers chat --handler
tests.chat.slow:create_handler``.

The tiny demo Qwen decodes a token in about a millisecond, too fast for a test to disconnect from a
generation, overrun a deadline or fill the waiting line. This factory builds the real ``ChatHandler`` (real
models, real engine, real routes) and makes every decode step sleep ``TEST_CHAT_STEP_DELAY_SECONDS`` first
(default 0.05 s), on both decode paths. The sleep is in the engine thread, where a slow GPU step would be.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from workers.chat import create_routes  # noqa: F401 - the real chat routes, mounted by ``python -m workers``
from workers.chat.batch import DecodeBatch
from workers.chat.handler import ChatHandler
from workers.chat.settings import ChatSettings
from workers.chat.slot_batch import SlotBatch


def slowed(step: Callable[[Any], None], delay: float) -> Callable[[Any], None]:
    def step_slowly(self: Any) -> None:
        time.sleep(delay)
        step(self)
    step_slowly.slowed = True  # type: ignore[attr-defined]
    return step_slowly


def slow_down(delay: float) -> None:
    """Make every decode step of this process sleep ``delay`` seconds first (idempotent)."""
    for batch in (SlotBatch, DecodeBatch):
        if not getattr(batch.step, "slowed", False):
            batch.step = slowed(batch.step, delay)


def create_handler(settings: ChatSettings) -> ChatHandler:
    slow_down(float(os.environ.get("TEST_CHAT_STEP_DELAY_SECONDS", "0.05")))
    return ChatHandler(settings)

"""What the generation loop is asked for and what it answers: one request, one finished generation.

Its own module because three layers use both types: the engine (engine.py) queues and completes them, the
two batch strategies (batch.py, slot_batch.py) decode them, and the service (service.py) builds them. Here they
depend on nothing above them, so each of those imports downward.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .models import ModelName
from .sampling import SamplingParams


@dataclass(eq=False)
class GenerationRequest:
    model: ModelName
    prompt_ids: list[int]
    sampling: SamplingParams
    on_tokens: Callable[[list[int]], None] | None = None   # called from the loop thread; must not block
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Stop generating for this request (the loop drops it before its next step)."""
        self.cancelled.set()


@dataclass(frozen=True)
class Generation:
    model: ModelName
    token_ids: list[int]
    finish_reason: str          # "stop" (a stop token) | "length" (max_tokens or the context end)
    prompt_tokens: int
    queued_seconds: float       # submit -> prefill
    seconds: float              # submit -> done

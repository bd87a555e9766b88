"""Chat worker: Qwen instruct/base behind one continuously batched generation loop, the chat HTTP API
(CONTRACT §5, plus OpenAI-compatible routes) and the chat_queue jobs.

    engine.py    the generation loop thread (submit -> Future), admission between decode steps
    slot_batch.py one model's running rows as slots of a static KV cache (slots.py); decode step replayed as
                 a CUDA graph per batch bucket (graphs.py) on CUDA
    decode.py    the lean decode step (Qwen2/Llama): fused q/k/v and gate/up (fused.py: no extra memory), about
                 half the kernels of transformers' forward; optionally torch.compile'd (CHAT_COMPILE_DECODE)
    batch.py     the fallback: left-padded DynamicCache, prefill/merge/step/remove
    sampling.py  per-request temperature, top_p, presence/frequency penalties, seeds
    prompt.py    chat template, context cut from the oldest turns
    models.py    loading/unloading the two models
    request.py   body decoding (HTTP and jobs), errors naming the field
    service.py   reply / stream / enhance: model choice, prompt, engine, sfw filter
    api.py, openai.py  the HTTP routes (a Blueprint, ``create_routes``);  handler.py  jobs, memory control, status
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Blueprint

    from workers.core.residency import Residency

    from .handler import ChatHandler
    from .settings import ChatSettings


def create_handler(settings: ChatSettings) -> ChatHandler:
    """The chat Handler (imported here, so the engine modules load without the HTTP stack)."""
    from .handler import ChatHandler

    return ChatHandler(settings)


def create_routes(handler: ChatHandler, residency: Residency) -> Blueprint:
    """The chat HTTP routes on ``handler``, for the worker service to mount (api.py)."""
    from .api import create_routes as chat_routes

    return chat_routes(handler, residency)


__all__ = ["create_handler", "create_routes"]

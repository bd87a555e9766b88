"""WAN 2.1 worker (``wan_queue``): text-to-video and text-to-image, reference frames through VACE, prompt
enhancement through the chat worker. ``python -m workers wan --port 7862`` serves it."""
from __future__ import annotations

from common.settings import Settings

from .handler import WanHandler


def create_handler(settings: Settings) -> WanHandler:
    return WanHandler(settings)


__all__ = ["WanHandler", "create_handler"]

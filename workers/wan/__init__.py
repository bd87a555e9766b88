"""WAN 2.1 worker (``wan_queue``): text-to-video and text-to-image, reference frames through VACE, prompt
enhancement through the chat worker. ``python -m workers wan --port 7862`` serves it."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Blueprint

    from workers.core.residency import Residency

    from .handler import WanHandler
    from .settings import WanSettings


def create_handler(settings: WanSettings) -> WanHandler:
    """The WAN Handler (imported here, so ``workers.wan.settings`` loads without torch)."""
    from .handler import WanHandler

    return WanHandler(settings)


def create_routes(handler: WanHandler, residency: Residency) -> Blueprint:
    """WAN's ``POST /enhance``, for the worker service to mount (routes.py)."""
    from .routes import create_routes as wan_routes

    return wan_routes(handler, residency)


__all__ = ["create_handler", "create_routes"]

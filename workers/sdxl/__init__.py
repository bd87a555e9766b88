"""SDXL image worker (``sdxl_queue``): ``python -m workers sdxl`` serves ``create_handler(settings)``."""
from __future__ import annotations

from .handler import SdxlHandler
from .settings import SdxlSettings


def create_handler(settings: SdxlSettings) -> SdxlHandler:
    return SdxlHandler(settings)


__all__ = ["SdxlHandler", "create_handler"]

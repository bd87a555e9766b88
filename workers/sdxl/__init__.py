"""SDXL image worker (``sdxl_queue``): ``python -m workers sdxl`` serves ``create_handler(settings)``."""
from __future__ import annotations

from common.settings import Settings

from .handler import SdxlHandler


def create_handler(settings: Settings) -> SdxlHandler:
    return SdxlHandler(settings)


__all__ = ["SdxlHandler", "create_handler"]

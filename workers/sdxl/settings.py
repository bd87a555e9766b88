"""The SDXL worker's settings: the runtime's, the diffusion and reference groups, its model and attention."""
from __future__ import annotations

from dataclasses import dataclass

from common.declare import var
from common.parsers import choice
from common.settings import Device, Diffusion, References, SdxlModel, Settings


@dataclass(frozen=True)
class SdxlSettings(Settings, Device, Diffusion, References, SdxlModel):
    """SDXL worker"""

    sdxl_attention: str = var("SDXL_ATTENTION", choice("sdpa", "xformers"), "sdpa",
                              "`sdpa`, or `xformers` when it is installed")

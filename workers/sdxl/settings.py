"""The SDXL worker's settings: the runtime's, the diffusion and reference groups, its model and attention."""
from __future__ import annotations

from dataclasses import dataclass

from common.declare import var
from common.parsers import boolean, choice
from common.settings import Device, Diffusion, References, SdxlModel, Settings


@dataclass(frozen=True)
class SdxlSettings(Settings, Device, Diffusion, References, SdxlModel):
    """SDXL worker"""

    sdxl_attention: str = var("SDXL_ATTENTION", choice("sdpa", "xformers"), "sdpa",
                              "`sdpa`, or `xformers` when it is installed")
    sdxl_compile_resnets: bool = var(
        "SDXL_COMPILE_RESNETS", boolean(), False,
        "with `COMPILE_BLOCKS`, compile the UNet's ResNet blocks too (same math; faster steps, a longer compile at "
        "start: off until a GPU run weighs the two, `python -m bench sdxl`)")

"""The WAN worker's settings (also ``wan_generate.py``'s): the runtime's, the diffusion and reference groups, the
client keys (it calls the chat worker's ``/enhance``), its models and prompt enhancement."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.declare import var
from common.parsers import boolean, number, path, url
from common.settings import ClientKeys, Device, Diffusion, References, Settings, WanModel


@dataclass(frozen=True)
class WanSettings(Settings, Device, Diffusion, References, ClientKeys, WanModel):
    """WAN worker"""

    wan_batched_cfg: bool = var("WAN_BATCHED_CFG", boolean(), True,
                                "conditional + unconditional passes as one batch-2 transformer forward per step")
    wan_fp8: bool = var("WAN_FP8", boolean(), False,
                        "the transformer blocks' bf16 linear layers in FP8 (torchao, row-wise scales; changes the "
                        "math, so off by default). Needs CUDA capability 8.9 or newer and torchao, else the worker "
                        "refuses to start")
    wan_fuse_qkv: bool = var(
        "WAN_FUSE_QKV", boolean(), False,
        "the attention's q/k/v projections as one matrix product (k/v for cross-attention), as diffusers' own "
        "speed recipe does (same math; about 0.7 GB more for WAN 1.3B: the unfused weights stay). Off until a GPU "
        "run measures it, `python -m bench wan`")
    wan_enhance_template: Path | None = var(
        "WAN_ENHANCE_TEMPLATE", path(), None, "instruction for WAN prompt enhancement (operator-replaceable)",
        shown="`workers/wan/enhance_template.txt`")
    wan_enhance_timeout_seconds: float = var("WAN_ENHANCE_TIMEOUT_SECONDS", number(0.5, 300), 20.0,
                                             "total time allowed for an enhancement call to the chat worker")
    chat_worker_url: str = var("CHAT_WORKER_URL", url(), "http://127.0.0.1:7861",
                               "the chat worker that enhances WAN prompts (set by the orchestrator)")

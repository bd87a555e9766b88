"""What a run builds and how big its workloads are.

``full``: the production architectures of ``bench/configs`` (copies of ``shared/model-configs``) on CUDA,
fp16 for SDXL and bf16 for WAN (VAE fp32) and Qwen, the issue's workload sizes. ``tiny``: the demo models'
configs on the CPU in fp32 (what the workers use there), tiny sizes, so the whole harness runs in seconds.
Tokenizers always come from the demo models (their ids stay below the real vocab sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# config key -> (file in bench/configs, file in the demo models folder)
CONFIGS = {
    "sdxl-unet": ("sdxl-unet.json", "sdxl/unet/config.json"),
    "sdxl-vae": ("sdxl-vae.json", "sdxl/vae/config.json"),
    "sdxl-text-encoder": ("sdxl-text-encoder.json", "sdxl/text_encoder/config.json"),
    "sdxl-text-encoder-2": ("sdxl-text-encoder-2.json", "sdxl/text_encoder_2/config.json"),
    "sdxl-scheduler": ("sdxl-scheduler.json", "sdxl/scheduler/scheduler_config.json"),
    "wan-transformer": ("wan21-t2v-1.3b-transformer.json", "wan/transformer/config.json"),
    "wan-vae": ("wan21-vae.json", "wan/vae/config.json"),
    "wan-text-encoder": ("wan21-text-encoder-umt5-xxl.json", "wan/text_encoder/config.json"),
    "wan-scheduler": ("wan21-scheduler.json", "wan/scheduler/scheduler_config.json"),
    "qwen": ("qwen2.5-7b.json", "qwen-instruct/config.json"),
}


@dataclass(frozen=True)
class Profile:
    name: str
    device: torch.device
    demo: Path                                   # demo models folder (tokenizers; tiny configs)
    sdxl_side: int = 1024
    sdxl_cases: tuple[tuple[int, int], ...] = ((15, 1), (15, 6), (25, 1))   # (steps, images)
    wan_width: int = 832
    wan_height: int = 480
    wan_frames: int = 81
    wan_video_steps: int = 4                     # measured; extrapolated to wan_full_steps
    wan_full_steps: int = 25
    wan_image_steps: int = 25
    qwen_prompt: int = 512
    qwen_ttft_prompt: int = 1024
    qwen_new: int = 128
    qwen_streams: int = 16
    repeats: int = 2
    warm_steps: int = 2

    @property
    def full(self) -> bool:
        return self.name == "full"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sdxl_dtype(self) -> torch.dtype:
        return torch.float16 if self.cuda else torch.float32

    @property
    def bf16(self) -> torch.dtype:
        """WAN transformer/text encoder and Qwen: bf16 on CUDA, fp32 on CPU (as the workers load them)."""
        return torch.bfloat16 if self.cuda else torch.float32

    def config_path(self, key: str) -> Path:
        full, demo = CONFIGS[key]
        return CONFIG_DIR / full if self.full else self.demo / demo

    def tokenizer_path(self, name: str) -> Path:
        return self.demo / name


def full(demo: Path) -> Profile:
    if not torch.cuda.is_available():
        raise SystemExit("the full-size benchmark needs a CUDA device (use --tiny on the CPU)")
    return Profile("full", torch.device("cuda"), demo)


def tiny(demo: Path, device: str = "cpu") -> Profile:
    return Profile("tiny", torch.device(device), demo, sdxl_side=64, sdxl_cases=((3, 1), (3, 3), (4, 1)),
                   wan_width=64, wan_height=48, wan_frames=9, wan_video_steps=3, wan_full_steps=5,
                   wan_image_steps=3, qwen_prompt=24, qwen_ttft_prompt=48, qwen_new=8, qwen_streams=4,
                   repeats=2, warm_steps=1)

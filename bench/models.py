"""Random-weight models built from their configs directly on the benchmark device.

Same FLOPs and bytes as the trained models. Each build is seeded, so building twice gives the same weights.
Dtypes follow what the workers' loaders produce from safetensors: SDXL all fp16 (its VAE upcasts itself
for the decode, ``force_upcast``); WAN transformer and UMT5 bf16 with the transformer's
``_keep_in_fp32_modules`` parameters in fp32 (diffusers' loader rule), WAN VAE fp32; Qwen bf16.
On the CPU (``--tiny``) everything is fp32, as there.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .profile import Profile

DROP_KEYS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}


def config(profile: Profile, key: str) -> dict[str, Any]:
    data = json.loads(Path(profile.config_path(key)).read_text())
    return {k: v for k, v in data.items() if k not in DROP_KEYS and not k.startswith("_")}


@contextlib.contextmanager
def building(device: torch.device, seed: int, default_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Seeded construction on ``device`` (optionally with a default dtype, to skip an fp32 copy)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    if default_dtype is not None:
        torch.set_default_dtype(default_dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def cast_like_loader(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)``, except diffusers' ``_keep_in_fp32_modules`` parameters and saved buffers,
    which diffusers' ``from_pretrained`` keeps in fp32 (matched on a dotted name part, as there)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) if _is_diffusers(model) else None
    if not keep or dtype == torch.float32:
        return model.to(dtype)
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(_target(f"{module_name}.{name}", keep, dtype))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(_target(f"{module_name}.{name}", keep, dtype))
    return model


def _target(name: str, keep: list[str], dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if any(k in name.split(".") for k in keep) else dtype


def _is_diffusers(model: torch.nn.Module) -> bool:
    from diffusers.models.modeling_utils import ModelMixin

    return isinstance(model, ModelMixin)


def dtypes(module: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> dtype (to compare a built model with what the production loader made)."""
    return {name: str(p.dtype).removeprefix("torch.") for name, p in module.named_parameters()}


def sdxl(profile: Profile, seed: int = 0):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = profile.sdxl_dtype
    with building(profile.device, seed):
        unet = UNet2DConditionModel.from_config(config(profile, "sdxl-unet")).to(dtype)
        vae = AutoencoderKL.from_config(config(profile, "sdxl-vae")).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**config(profile, "sdxl-text-encoder"))).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**config(profile, "sdxl-text-encoder-2"))).to(dtype)
    for module in (unet, vae, te1, te2):
        module.eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(profile.tokenizer_path("sdxl/tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(profile.tokenizer_path("sdxl/tokenizer_2")),
        scheduler=EulerDiscreteScheduler.from_config(config(profile, "sdxl-scheduler")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan(profile: Profile, seed: int = 0):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    dtype = profile.bf16
    transformer = wan_transformer(profile, seed)
    with building(profile.device, seed):
        vae = AutoencoderKLWan.from_config(config(profile, "wan-vae")).to(torch.float32)
    with building(profile.device, seed + 1, dtype):   # 5.7 B parameters: no fp32 copy first
        text_encoder = UMT5EncoderModel(UMT5Config(**config(profile, "wan-text-encoder")))
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(profile.tokenizer_path("wan/tokenizer")),
                       text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler.from_config(config(profile, "wan-scheduler")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_transformer(profile: Profile, seed: int = 0):
    """The WAN transformer alone, dtypes as the production loader leaves them; ``eval()``, no gradients."""
    from diffusers import WanTransformer3DModel

    with building(profile.device, seed):
        model = cast_like_loader(WanTransformer3DModel.from_config(config(profile, "wan-transformer")),
                                 profile.bf16)
    return model.eval().requires_grad_(False)


def qwen(profile: Profile, seed: int = 0):
    """(model, tokenizer) of Qwen2.5-7B's architecture; ``eval()``, no gradients."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    with building(profile.device, seed, profile.bf16):
        model = Qwen2ForCausalLM(Qwen2Config(**config(profile, "qwen")))
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(profile.tokenizer_path("qwen-instruct"))


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""The resident SDXL pipelines: loaded once, offline, one set of weights shared by text-to-image and
image-to-image.

``SDXL_MODEL_PATH`` is a single-file checkpoint (``.safetensors``/``.ckpt``, loaded with
``from_single_file(config=SDXL_CONFIG_PATH)`` so no hub is needed) or a diffusers folder. fp16 on CUDA,
fp32 on CPU. Attention is PyTorch SDPA (diffusers' default); xformers only when ``SDXL_ATTENTION=xformers``
and the package is importable. On CUDA: VAE slicing (a batch of 6 decodes one image at a time), optional
``torch.compile`` of the whole UNet in place (``TORCH_COMPILE``; so both pipelines keep the same object), or
else (the defaults) the UNet's transformer blocks compiled (``COMPILE_BLOCKS``, workers/gpu/regional.py) and
the UNet and text encoders replayed as one CUDA graph per input shape (``CUDA_GRAPHS``, workers/gpu/graphed.py:
the same kernels without ~2,000 Python-side launches per UNet step), all warmed up by
:meth:`SdxlPipelines.warm_up` for the default shapes before the worker reports ready. Channels-last was measured
on an H100 and left out: no gain at batch 2, 11 % slower at batch 12 (SDPA dominates at 1024²).
"""
from __future__ import annotations

import gc
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.settings import Settings
from workers.gpu.device import resolve_device

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# (width, height, batch) compiled before the worker reports ready: the batch sizes at the default size.
# Static shapes: measured on an H100 (random-weight SDXL, 15 steps, 1/3/6 images) eager 1.03/2.30/4.44 s,
# static compile 0.72/1.97/3.84 s, dynamic compile 0.88/2.08/4.10 s (and portrait sizes still recompiled).
# Warm-up of these three shapes: about 290 s. Any other size compiles on its first job (about 90 s) until
# dynamo's recompile limit, after which that size runs eagerly.
WARM_UP_SHAPES = ((1024, 1024, 1), (1024, 1024, 3), (1024, 1024, 6))
# Replayed as CUDA graphs (CUDA_GRAPHS): the UNet (~2,000 launches per step) and both text encoders (four
# host-bound forwards per job). The VAE is left eager: diffusers casts it to fp32 and back around every
# decode, which moves its weights, and its decode is GPU-bound anyway.
GRAPHED_MODULES = ("unet", "text_encoder", "text_encoder_2")
# Compiled in place when COMPILE_BLOCKS is on (workers/gpu/regional.py): the UNet's 70 transformer blocks share
# one compiled graph; ~10 s of compile in the warm-up, each step 10 % faster (`python -m bench levers`, SDXL case).
COMPILED_BLOCKS = ("BasicTransformerBlock",)
# With SDXL_COMPILE_RESNETS too: the 22 ResNet blocks (GroupNorm, SiLU and the residual add fused around the
# convolutions); on an H100 (levers, batch 2, static) a step 38.8 -> 34.8 ms for ~24 s more compile at start.
RESNET_BLOCKS = ("ResnetBlock2D",)


def model_name(path: Path) -> str:
    """What status reports: the file stem or folder name, never the path."""
    return path.stem if path.suffix in SINGLE_FILE_SUFFIXES else path.name


@dataclass(kw_only=True)
class SdxlPipelines:
    t2i: Any
    i2i: Any
    device: Any
    dtype: Any
    name: str
    attention: str = "sdpa"
    compiled: bool = False
    compiled_blocks: int = 0
    notes: list[str] = field(default_factory=list)
    graphs: dict[str, Any] = field(default_factory=dict)   # module -> workers.gpu.graphed.ForwardGraphs

    @classmethod
    def from_t2i(cls, t2i: Any, device: Any, name: str, *, attention: str = "sdpa",
                 compile_unet: bool = False, cuda_graphs: bool = False,
                 compile_blocks: bool = False, compile_resnets: bool = False) -> SdxlPipelines:
        """Finish a loaded text-to-image pipeline: device, attention, VAE slicing, compile (the whole UNet,
        or its transformer blocks) and/or CUDA graphs, the img2img twin."""
        from diffusers import StableDiffusionXLImg2ImgPipeline

        from workers.gpu import graphed, regional

        t2i.to(device)
        t2i.set_progress_bar_config(disable=True)
        notes: list[str] = []
        attention = _attention(t2i, attention, device, notes)
        if device.type == "cuda":
            t2i.vae.enable_slicing()
        compiled, blocks, graphs = False, 0, {}
        if compile_unet:
            t2i.unet.compile(fullgraph=False, dynamic=False)
            compiled = True
        elif compile_blocks:
            blocks = regional.compile_blocks(t2i.unet, COMPILED_BLOCKS + (RESNET_BLOCKS if compile_resnets else ()))
        if cuda_graphs and not compiled:
            pool = graphed.SharedPool()
            for part in GRAPHED_MODULES:
                installed = graphed.install(getattr(t2i, part), f"SDXL {part}", pool=pool)
                if installed is not None:
                    graphs[part] = installed
        dtype = t2i.unet.dtype
        # from_pipe casts every shared module to its ``dtype`` argument, float32 when none is given: without
        # it the fp16 UNet silently becomes fp32 (3-6x slower on an H100, twice the memory)
        i2i = StableDiffusionXLImg2ImgPipeline.from_pipe(t2i, dtype=dtype)
        i2i.set_progress_bar_config(disable=True)
        return cls(t2i=t2i, i2i=i2i, device=device, dtype=dtype, name=name,
                   attention=attention, compiled=compiled, compiled_blocks=blocks, notes=notes, graphs=graphs)

    @property
    def needs_warm_up(self) -> bool:
        return self.compiled or bool(self.compiled_blocks) or bool(self.graphs)

    def describe_graphs(self) -> dict[str, Any] | None:
        return {part: graphs.describe() for part, graphs in self.graphs.items()} or None

    def release_graphs(self) -> None:
        """Drop every captured graph and its memory (after an out-of-memory error); re-captured on use."""
        for graphs in self.graphs.values():
            graphs.release()

    def warm_up(self, shapes: tuple[tuple[int, int, int], ...] = WARM_UP_SHAPES) -> None:
        """Run each (width, height, batch) once, 2 steps, so ``torch.compile`` or the CUDA graph captures
        are done before the first job (in inference mode, as jobs run)."""
        import torch

        for width, height, batch in shapes:
            generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
            with torch.inference_mode():
                self.t2i(prompt="warm-up", width=width, height=height, num_inference_steps=2,
                         num_images_per_prompt=batch, generator=generators, output_type="latent")

    def restore(self) -> None:
        """Undo what an interrupted call can leave behind: diffusers upcasts the fp16 VAE to fp32 for the
        decode and casts it back only when the decode returns (an out-of-memory error there leaves it fp32,
        and the next call then fails on mixed dtypes); VAE tiling is only for OOM retries."""
        if self.t2i is None:
            return
        vae = self.t2i.vae
        if vae.dtype != self.dtype:
            vae.to(dtype=self.dtype)
        vae.disable_tiling()

    def close(self) -> None:
        """Drop the pipelines and give the memory back (GPU cache included)."""
        import torch

        from workers.gpu import graphed

        if self.t2i is not None:
            for part in self.graphs:
                graphed.uninstall(getattr(self.t2i, part))
        self.graphs = {}
        self.t2i = self.i2i = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load(settings: Settings) -> SdxlPipelines:
    """Load ``SDXL_MODEL_PATH`` (offline) onto the configured device. Raises ``ConfigError`` for settings
    that cannot work and lets loader errors through (the handler turns them into ``MODEL_LOAD_ERROR``)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    settings.require("sdxl_model_path")
    path = Path(settings.sdxl_model_path)
    device = resolve_device(settings.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        if settings.sdxl_config_path is None or not Path(settings.sdxl_config_path).is_dir():
            raise ConfigError("SDXL_CONFIG_PATH must name a diffusers SDXL folder to load a single-file "
                              "checkpoint offline")
        t2i = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(settings.sdxl_config_path), local_files_only=True, dtype=dtype)
    elif path.is_dir():
        variant = "fp16" if dtype == torch.float16 and _has_fp16_variant(path) else None
        t2i = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                        variant=variant)
    else:
        raise ConfigError("SDXL_MODEL_PATH must be a .safetensors/.ckpt file or a diffusers folder that exists")
    return SdxlPipelines.from_t2i(t2i, device, model_name(path), attention=settings.sdxl_attention,
                                  compile_unet=settings.torch_compile, cuda_graphs=settings.cuda_graphs,
                                  compile_blocks=settings.compile_blocks,
                                  compile_resnets=settings.sdxl_compile_resnets)


def _has_fp16_variant(folder: Path) -> bool:
    return any((folder / "unet").glob("*.fp16.safetensors"))


def _attention(pipe: Any, wanted: str, device: Any, notes: list[str]) -> str:
    if wanted != "xformers":
        return "sdpa"
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        notes.append("xformers asked for but not available here; using PyTorch SDPA")
        log.warning("SDXL_ATTENTION=xformers but xformers is not usable here; using PyTorch SDPA")
        return "sdpa"
    pipe.enable_xformers_memory_efficient_attention()
    return "xformers"

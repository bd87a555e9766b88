"""Levers tried on the bare modules, side by side in one process, before any of them goes into a worker.

- SDXL UNet, one CFG forward (batch 2 = one image; batch 12 = six) at the benchmark size, replayed as a CUDA
  graph exactly as the worker does (workers/gpu/graphed.py): plain; with cuDNN autotuning
  (``torch.backends.cudnn.benchmark``); with fused q/k/v projections (diffusers' ``fuse_qkv_projections``);
  with the transformer blocks ``torch.compile``d (regional compilation: every ``BasicTransformerBlock`` shares
  one compiled graph per input shape, so the compile is seconds, not the whole UNet's minutes), static and
  dynamic shapes; then the ResNet blocks compiled as well.
- SDXL VAE fp32 decode with and without cuDNN autotuning.
- WAN transformer, one pass at the video size (81 frames), eager (videos are not graphed) against its
  ``WanTransformerBlock``s compiled (dynamic shapes, as the workers do).
- The plain and the compiled UNet/WAN outputs against the same forward in fp32: whether a variant's
  difference from the plain module is rounding (both equally far from fp32) or error.

Each variant reports its time per forward (median of the replays), the first call's time (capture, and the
compile where there is one) and its output's relative error against the plain module's.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.gpu import graphed, regional

from . import models
from .context import Context
from .measure import free, rel_err, sync

SECTION = "levers"
REPLAYS = 10


def run(ctx: Context) -> None:
    ctx.step(SECTION, "sdxl_unet", 240, lambda: _sdxl(ctx))
    ctx.step(SECTION, "wan_blocks", 150, lambda: _wan(ctx))


def _median_call(fn: Callable[[], Any], device: torch.device, times: int = REPLAYS) -> float:
    seconds = []
    for _ in range(times):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


class Variants:
    """Measures variants of one module's forward against the first one measured (the reference); the results go
    to ``section``'s details under ``key``."""

    def __init__(self, ctx: Context, key: str, device: torch.device, section: str = SECTION):
        self.ctx, self.key, self.device, self.section = ctx, key, device, section
        self.reference: dict[int, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.results: dict[str, Any] = {}

    def measure(self, name: str, module: torch.nn.Module, call: Callable[[int], torch.Tensor], batch: int,
                graph: bool) -> None:
        graphs = graphed.install(module, f"bench {name}") if graph else None   # None off CUDA
        try:
            sync(self.device)
            started = time.perf_counter()
            out = call(batch).clone()
            sync(self.device)
            first = time.perf_counter() - started
            seconds = _median_call(lambda: call(batch), self.device, REPLAYS if graph else 3)
            entry: dict[str, Any] = {"s": round(seconds, 5), "first_call_s": round(first, 2)}
            if graphs is not None:
                described = graphs.describe()
                entry["graphs"], entry["eager_calls"] = described["graphs"], described["eager_calls"]
            self.outputs[f"{name}_batch{batch}"] = out
            if batch in self.reference:
                entry["rel_err"] = float(f"{rel_err(out, self.reference[batch]):.3e}")
            else:
                self.reference[batch] = out
        finally:
            graphed.uninstall(module)
        self.results[f"{name}_batch{batch}"] = entry
        print(f"[{self.section}] {self.key} {name} batch {batch}: {entry}", flush=True)
        self.ctx.report.detail(self.section, self.key, self.results)


    def against_fp32(self, model: torch.nn.Module, call: Callable[[], torch.Tensor], batch: int) -> None:
        """Each output at ``batch`` against the same forward in fp32 (``model`` is cast for good): which
        variant is nearer the exact result, not only how far the variants are from each other."""
        model.float()
        with torch.inference_mode():
            exact = call().float()
        errors = {name: float(f"{rel_err(out.float(), exact):.3e}")
                  for name, out in self.outputs.items() if name.endswith(f"_batch{batch}")}
        self.results[f"rel_err_to_fp32_batch{batch}"] = errors
        print(f"[{self.section}] {self.key} against fp32 at batch {batch}: {errors}", flush=True)
        self.ctx.report.detail(self.section, self.key, self.results)


def _fp32(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def _compile_blocks(model: torch.nn.Module, class_names: tuple[str, ...], dynamic: bool, full: bool) -> int:
    """The blocks compiled in place (inductor; dynamo alone in a tiny CPU run)."""
    return regional.compile_matching(model, class_names, dynamic, "inductor" if full else "eager")


def _uncompile(model: torch.nn.Module) -> None:
    regional.uncompile_blocks(model)
    torch._dynamo.reset()


def _sdxl(ctx: Context) -> None:
    p, dev = ctx.profile, ctx.profile.device
    pipe = models.sdxl(p)
    unet, dtype = pipe.unet, p.sdxl_dtype
    side = p.sdxl_side // 8
    generator = torch.Generator(dev).manual_seed(0)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim   # 1280 at full size
    cases = {}
    for batch in (2, 12):
        cases[batch] = dict(
            sample=torch.randn(batch, 4, side, side, generator=generator, device=dev, dtype=dtype),
            timestep=torch.tensor(500.0, device=dev),
            encoder_hidden_states=torch.randn(
                batch, 77, c.cross_attention_dim, generator=generator, device=dev, dtype=dtype
            ),
            added_cond_kwargs={
                "text_embeds": torch.randn(batch, pooled, generator=generator, device=dev, dtype=dtype),
                "time_ids": torch.tensor(
                    [[p.sdxl_side, p.sdxl_side, 0, 0, p.sdxl_side, p.sdxl_side]] * batch, device=dev, dtype=dtype
                ),
            },
        )

    def call(batch: int) -> torch.Tensor:
        with torch.inference_mode():
            return unet(**cases[batch], return_dict=False)[0]

    v = Variants(ctx, "sdxl_unet", dev)
    batches = (2, 12) if p.full else (2,)
    for batch in batches:
        v.measure("graphed", unet, call, batch, graph=True)
    torch.backends.cudnn.benchmark = True
    v.measure("graphed_cudnn_benchmark", unet, call, 2, graph=True)
    torch.backends.cudnn.benchmark = False
    unet.fuse_qkv_projections()
    v.measure("graphed_fused_qkv", unet, call, 2, graph=True)
    unet.unfuse_qkv_projections()
    v.results["compiled_transformer_blocks"] = _compile_blocks(unet, ("BasicTransformerBlock",), dynamic=False,
                                                               full=p.full)
    v.measure("graphed_compiled_blocks_static", unet, call, 2, graph=True)
    _uncompile(unet)
    _compile_blocks(unet, ("BasicTransformerBlock",), dynamic=True, full=p.full)
    for batch in batches:
        v.measure("graphed_compiled_blocks_dynamic", unet, call, batch, graph=True)
    _uncompile(unet)
    if ctx.deadline.allows(120) or not p.full:
        v.results["compiled_resnet_blocks"] = _compile_blocks(unet, ("BasicTransformerBlock", "ResnetBlock2D"),
                                                              dynamic=False, full=p.full)
        v.measure("graphed_compiled_blocks_and_resnets_static", unet, call, 2, graph=True)
        _uncompile(unet)
    _vae(ctx, pipe, v)
    _uncompile(unet)
    v.against_fp32(unet, lambda: unet(**_fp32(cases[2]), return_dict=False)[0], 2)
    pipe = unet = cases = None  # drop the references (free the memory) before what follows
    free(dev)


def _vae(ctx: Context, pipe: Any, v: Variants) -> None:
    p, dev = ctx.profile, ctx.profile.device
    side = p.sdxl_side // 8
    latents = torch.randn(1, 4, side, side, generator=torch.Generator(dev).manual_seed(1), device=dev) * 0.5
    vae = pipe.vae.to(torch.float32)

    def decode(_batch: int) -> torch.Tensor:
        with torch.inference_mode():
            return vae.decode(latents, return_dict=False)[0]

    v.measure("vae_decode_fp32", vae, decode, 1, graph=False)
    torch.backends.cudnn.benchmark = True
    try:
        v.measure("vae_decode_fp32_cudnn_benchmark", vae, decode, 1, graph=False)
    finally:
        torch.backends.cudnn.benchmark = False
        vae.to(p.sdxl_dtype)


def _wan(ctx: Context) -> None:
    p, dev = ctx.profile, ctx.profile.device
    transformer = models.wan_transformer(p)
    config = transformer.config
    frames = (p.wan_frames - 1) // 4 + 1
    generator = torch.Generator(dev).manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, config.in_channels, frames, p.wan_height // 8, p.wan_width // 8,
                                  generator=generator, device=dev, dtype=p.bf16),
        timestep=torch.tensor([500.0], device=dev),
        encoder_hidden_states=torch.randn(1, 512, config.text_dim, generator=generator, device=dev, dtype=p.bf16))

    def call(_batch: int) -> torch.Tensor:
        with torch.inference_mode():
            return transformer(**inputs, return_dict=False)[0]

    v = Variants(ctx, "wan_transformer_video", dev)
    v.measure("eager", transformer, call, 1, graph=False)
    v.results["compiled_blocks"] = _compile_blocks(transformer, ("WanTransformerBlock",), dynamic=True,
                                                  full=p.full)
    v.measure("compiled_blocks_dynamic", transformer, call, 1, graph=False)
    _uncompile(transformer)
    v.against_fp32(transformer, lambda: transformer(**_fp32(inputs), return_dict=False)[0], 1)
    transformer = inputs = None  # drop the references (free the memory) before what follows
    free(dev)

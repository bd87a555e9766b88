"""diffusers' own speed recipe on the benchmark's pipeline, measured between the eager baseline and our handler.

The recipe is what diffusers documents for fast inference ("Accelerate inference"): the UNet in channels-last
memory format, fused QKV projections and regional compilation, ``compile_repeated_blocks(fullgraph=True)``
(every repeated block, ``_repeated_blocks``, compiled in place; inductor, the default mode).
- SDXL: ``pipe.unet.to(memory_format=torch.channels_last)``, ``pipe.fuse_qkv_projections()`` (the UNet's and the
  VAE's attention, ``FusedAttnProcessor2_0``), ``pipe.unet.compile_repeated_blocks(fullgraph=True)``.
- WAN: ``pipe.transformer.fuse_qkv_projections()`` (``WanAttention`` fuses q/k/v, or k/v for cross-attention)
  and ``pipe.transformer.compile_repeated_blocks(fullgraph=True)``. Channels-last does not apply: the
  transformer's one convolution is the 3-D patch embedding, and the recipe is written for 2-D UNets.

It runs on the very modules the baseline just measured, warmed up on every shape the timed calls use (the
warm-up time, compile included, is reported, and so is the number of graphs dynamo made), and is then undone
exactly (blocks uncompiled, projections unfused and the fused layers deleted, contiguous memory format,
``torch._dynamo.reset()``), before our handler is set up. The undo is checked twice: the modules' fingerprint
(parameter names, shapes, strides, dtypes and float64 sums; attention processor classes; compiled blocks) equals
the one taken before, and one short eager call gives the same latents as the same call before the recipe.

Dynamo runs with ``suppress_errors`` off for the recipe (the worker's ``regional.compile_blocks`` turns it on
for the whole process): a graph break under ``fullgraph=True`` is an error the step records, never a silent
fall-back to eager that would be timed as "the library". On the CPU (``--tiny``, the harness check) dynamo traces
the same blocks with ``fullgraph=True`` but hands them to its ``eager`` backend (``backend()``): a graph break still
fails the step, and apply, warm-up and undo run as on the GPU, without minutes of CPU inductor code generation
that the GPU never runs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.gpu import regional

from .context import Context
from .measure import BF16_TOLERANCE, rel_err, sync

SDXL_NOTE = "diffusers: channels-last UNet, fused QKV, compile_repeated_blocks(fullgraph=True); no PNG"
WAN_NOTE = "diffusers: fused QKV, compile_repeated_blocks(fullgraph=True); no PNG/MP4"
FUSED_LAYERS = ("to_qkv", "to_kv", "to_added_qkv", "to_added_kv")
RESTORED_TOLERANCE = 1e-6    # an exact undo gives 0: the same kernels on the same tensors


def backend(device: torch.device) -> str:
    """The compile backend of the recipes: inductor (diffusers' and transformers' default) on CUDA, dynamo's
    eager backend elsewhere (see the module doc)."""
    return "inductor" if device.type == "cuda" else "eager"


@dataclass
class Recipe:
    """A library recipe as in-place changes to ``modules``: ``apply`` returns what it did, ``undo`` reverses it
    and is safe after an ``apply`` that failed half-way."""
    name: str
    modules: dict[str, torch.nn.Module]
    apply: Callable[[], dict[str, Any]]
    undo: Callable[[], None]


def sdxl_recipe(pipe: Any) -> Recipe:
    def apply() -> dict[str, Any]:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.fuse_qkv_projections()
        pipe.unet.compile_repeated_blocks(fullgraph=True, backend=backend(pipe.unet.device))
        return {"channels_last": ["unet"], "fused_qkv": ["unet", "vae"],
                "compiled_blocks": regional.compiled_blocks(pipe.unet)}

    def undo() -> None:
        regional.uncompile_blocks(pipe.unet)
        if getattr(pipe, "fusing_unet", False) or getattr(pipe, "fusing_vae", False):
            pipe.unfuse_qkv_projections()   # the original attention processors back
        for model in (pipe.unet, pipe.vae):
            drop_fused_layers(model)
        pipe.unet.to(memory_format=torch.contiguous_format)
        torch._dynamo.reset()

    return Recipe(SDXL_NOTE, {"unet": pipe.unet, "vae": pipe.vae}, apply, undo)


def wan_recipe(pipe: Any) -> Recipe:
    def apply() -> dict[str, Any]:
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend(pipe.transformer.device))
        return {"channels_last": [], "fused_qkv": ["transformer"],
                "compiled_blocks": regional.compiled_blocks(pipe.transformer)}

    def undo() -> None:
        regional.uncompile_blocks(pipe.transformer)
        pipe.transformer.unfuse_qkv_projections()
        drop_fused_layers(pipe.transformer)
        torch._dynamo.reset()

    return Recipe(WAN_NOTE, {"transformer": pipe.transformer}, apply, undo)


def drop_fused_layers(model: torch.nn.Module) -> None:
    """Delete the fused projection layers and clear the flag. The older ``Attention`` class has no
    ``unfuse_projections``: diffusers' unfuse only puts the processors back and leaves ``to_qkv`` allocated."""
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name in FUSED_LAYERS:
            if name in module._modules:
                delattr(module, name)
        module.fused_projections = False


def fingerprint(modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """What an exact undo must give back: per parameter and buffer its shape, stride, dtype and float64 sum;
    the attention processors' classes; how many blocks are compiled."""
    out: dict[str, Any] = {}
    for key, model in modules.items():
        tensors = [(f"{key}.{n}", t) for n, t in [*model.named_parameters(), *model.named_buffers()]]
        sums = torch.stack([t.detach().double().sum() for _, t in tensors]).tolist() if tensors else []
        for (name, t), total in zip(tensors, sums):
            out[name] = (tuple(t.shape), t.stride(), str(t.dtype), total)
        processors = getattr(model, "attn_processors", {})
        out[f"{key}:processors"] = sorted({f"{n}={type(p).__name__}" for n, p in processors.items()})
        out[f"{key}:compiled"] = regional.compiled_blocks(model)
    return out


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changed = [k for k in before if k in after and before[k] != after[k]]
    return ([f"missing {k}" for k in before if k not in after] + [f"new {k}" for k in after if k not in before]
            + [f"changed {k}" for k in changed])


def run(ctx: Context, section: str, recipe: Recipe, reference: Callable[[], torch.Tensor],
        warm: Callable[[], None], measures: list[tuple[str, float, Callable[[], None]]], warm_needs: float) -> bool:
    """Apply ``recipe``, warm it up, run ``measures`` (name, expected seconds, fn), and undo it, whatever failed on
    the way. ``reference`` is one short eager call returning its latents, made before and after. Returns False
    only when the undo itself raised (the modules' state is then unknown and our handler must not be measured on
    them); an undo that ran but left a difference is a failed check, and the run goes on."""
    before_call = ctx.step(section, "library reference call", 10, reference)
    before = fingerprint(recipe.modules)
    graphs = graphs_made()
    try:
        with torch._dynamo.config.patch(suppress_errors=False):
            applied = ctx.step(section, "library recipe: apply + warm-up (compile)", warm_needs,
                               lambda: _warm_up(ctx, section, recipe, warm))
            if applied is not None:
                for name, needs, fn in measures:
                    ctx.step(section, name, needs, fn)
    finally:
        ctx.report.detail(section, "library_dynamo_graphs_with_timed_calls", graphs_made() - graphs)
        undone = _undo(ctx, section, recipe)
    if undone:
        _check_undone(ctx, section, recipe, before, before_call, reference)
    return undone


def _undo(ctx: Context, section: str, recipe: Recipe) -> bool:
    try:
        recipe.undo()
        sync(ctx.profile.device)
        return True
    except Exception as exc:  # noqa: BLE001 - recorded; the caller must not go on with these modules
        ctx.report.error(f"{section}/library undo", exc)
        return False


def graphs_made() -> int:
    """How many graphs dynamo has made so far (a running count; differences are what a stretch compiled)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _warm_up(ctx: Context, section: str, recipe: Recipe, warm: Callable[[], None]) -> dict[str, Any]:
    graphs = graphs_made()
    sync(ctx.profile.device)
    started = time.perf_counter()
    applied = recipe.apply()
    warm()
    sync(ctx.profile.device)
    applied |= {"warmup_s": round(time.perf_counter() - started, 2),
                "dynamo_graphs": graphs_made() - graphs, "backend": backend(ctx.profile.device),
                "dynamo_suppress_errors": torch._dynamo.config.suppress_errors}
    ctx.report.detail(section, "library_recipe", {"recipe": recipe.name} | applied)
    return applied


def _check_undone(ctx: Context, section: str, recipe: Recipe, before: dict[str, Any],
                  before_call: torch.Tensor | None, reference: Callable[[], torch.Tensor]) -> None:
    changed = differences(before, fingerprint(recipe.modules))
    detail = f"fingerprint: {len(changed)} differ" + (f" (e.g. {changed[:4]})" if changed else "")
    passed = not changed
    if before_call is None:
        detail += "; no short call compared (the reference call did not run)"
    else:
        try:
            err = rel_err(reference(), before_call)
        except Exception as exc:  # noqa: BLE001 - the check fails, saying why
            ctx.report.error(f"{section}/library reference call after the undo", exc)
            err = float("nan")
        passed = passed and err <= RESTORED_TOLERANCE
        detail += f"; a short eager call's latents against the same call before the recipe: rel err {err:.1e}"
    ctx.report.check(f"{section}: library recipe undone, modules as before", passed, detail)


def compare(ctx: Context, label: str, latents: torch.Tensor | None, base_latents: torch.Tensor | None,
            images: np.ndarray | None = None, base_images: np.ndarray | None = None) -> dict[str, float]:
    """The recipe's output against the eager baseline's on the same inputs (checks, as ours are checked)."""
    errors: dict[str, float] = {}
    if latents is not None and base_latents is not None:
        errors["latents_rel_err"] = err = rel_err(latents, base_latents)
        ctx.report.check(f"{label} library recipe latents vs eager", err <= BF16_TOLERANCE, f"rel err {err:.2e}")
    if images is not None and base_images is not None:
        errors["images_rel_err"] = err = rel_err(images, base_images)
        diff = int(np.abs(images.astype(int) - base_images.astype(int)).max())
        ctx.report.check(f"{label} library recipe images vs eager", err <= BF16_TOLERANCE,
                         f"rel err {err:.2e}, max |Δpixel| {diff}/255")
    return errors

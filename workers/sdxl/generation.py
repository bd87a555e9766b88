"""One batched diffusion call per job, with the OOM ladder (CONTRACT §7).

All ``num_images`` images come from one pipeline call with one CPU generator per image seeded
``seed + i``, so image *i* is the same whether it was made in a batch of 6, of 3 or alone. On CUDA
out-of-memory: free the cache and retry the same batch once (with VAE tiling on), then go down the batch
sizes (6 -> 3 -> 1) keeping the images already made, then ``OOM_ERROR``.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.core.errors import ErrorType, WorkerError
from workers.core.handler import Progress

from . import weighting
from .images import to_pil
from .pipeline import SdxlPipelines
from .request import BATCH_SIZES, SdxlRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    request: SdxlRequest
    steps: int                       # scheduler steps (raised by the img2img floor)
    strength: float | None           # img2img strength, None for text-to-image
    reference: Any = None            # letterboxed PIL image for img2img


@dataclass(frozen=True)
class Outcome:
    images: list[Any]
    batch_size: int                  # the largest batch that ran in one call
    oom_retries: int                 # out-of-memory events survived


def generate(pipes: SdxlPipelines, plan: Plan, progress: Progress) -> Outcome:
    request = plan.request
    pipe = pipes.i2i if plan.reference is not None else pipes.t2i
    prompt_args = _prompt_args(pipe, request)
    state = {"done": 0}

    def call(start: int, count: int) -> list[Any]:
        import torch

        generators = [torch.Generator("cpu").manual_seed(request.seed + start + i) for i in range(count)]
        real_steps = max(1, int(plan.steps * plan.strength) if plan.strength is not None else plan.steps)

        def on_step(_pipe: Any, step: int, _timestep: Any, tensors: dict) -> dict:
            fraction = (state["done"] + count * min(step + 1, real_steps) / real_steps) / request.num_images
            progress(min(0.99, fraction), f"step {step + 1}/{real_steps}")
            return tensors

        args = dict(prompt_args, num_inference_steps=plan.steps, guidance_scale=request.guidance_scale,
                    num_images_per_prompt=count, generator=generators, callback_on_step_end=on_step)
        if plan.reference is not None:
            args.update(image=plan.reference, strength=plan.strength)
        else:
            args.update(width=request.width, height=request.height)
        with torch.inference_mode():
            images = to_pil(pipe(**args, output_type="pt").images)
        state["done"] += count
        return images

    return oom_ladder(request.num_images, call, lambda: _free(pipes))


def oom_ladder(total: int, call: Callable[[int, int], list[Any]], free: Callable[[], None]) -> Outcome:
    """Make ``total`` images with ``call(start, count)``: whole batch, one retry after ``free()``, then
    smaller batches (keeping finished images), then ``WorkerError(OOM_ERROR)``."""
    import torch

    sizes = [total] + [s for s in sorted(BATCH_SIZES, reverse=True) if s < total]
    images: list[Any] = []
    retries = 0
    largest = 0
    tries_at_size = 0
    index = 0
    while len(images) < total:
        size = min(sizes[index], total - len(images))
        try:
            images += call(len(images), size)
            largest = max(largest, size)
            continue
        except torch.OutOfMemoryError:
            retries += 1
            log.warning("CUDA out of memory at batch %d (event %d); freeing memory", size, retries)
        free()
        tries_at_size += 1
        if index == 0 and tries_at_size == 1:
            continue  # retry the same batch once
        index += 1
        tries_at_size = 0
        if index >= len(sizes):
            raise WorkerError("out of GPU memory even at batch size 1", ErrorType.OOM_ERROR)
    return Outcome(images, largest, retries)


def _prompt_args(pipe: Any, request: SdxlRequest) -> dict[str, Any]:
    """Plain text for the pipeline to encode, or weighted embeddings when compel weighting applies."""
    if not (request.compel_applied or request.negative_weighted):
        return {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    embeds, pooled = weighting.encode(pipe, request.segments)
    args: dict[str, Any] = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if request.negative_prompt:
        segments = request.negative_segments or (weighting.Segment(request.negative_prompt),)
        negative, negative_pooled = weighting.encode(pipe, segments)
        args.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return args


def _free(pipes: SdxlPipelines) -> None:
    import torch

    pipes.restore()
    pipes.release_graphs()   # the graphs' memory pool holds a whole forward's activations
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if pipes.t2i is not None and pipes.device.type == "cuda":
        pipes.t2i.vae.enable_tiling()  # cheaper decode for the retry; turned off after the job

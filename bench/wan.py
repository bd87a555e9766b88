"""WAN 2.1 T2V 1.3B: the handler's ``run()`` (job in, PNG or MP4 out) next to a plain ``WanPipeline`` call on
the same modules, prompt, seed, guidance and scheduler config.

The 81-frame video runs ``wan_video_steps`` steps (4 at full size) and is extrapolated to 25: the time of one
CFG step is the median gap between step callbacks (each after a device synchronisation), and
``25 × step + (total − steps × step)`` is reported, the second term being text encoding, VAE decode and
(ours) the MP4 encode. The single frame runs all its 25 steps. The handler gets the built pipeline through a
``WanModels`` whose ``load()`` adopts it instead of reading ``WAN_MODEL_PATH`` (the real loader is timed in
the ``load`` section). Between baseline and handler, diffusers' own recipe (bench/peers.py: fused QKV,
``compile_repeated_blocks(fullgraph=True)``) runs the baseline's two cases on the same pipeline, the video
extrapolated in the same way, and is undone before the handler adopts the pipeline.
"""
from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.core.job import decode
from workers.gpu import graphed, regional
from workers.wan.handler import WanHandler
from workers.wan.pipeline import WanModels, to_uint8
from workers.wan.request import TIER_DEFAULTS
from workers.wan.settings import WanSettings

from . import models, peers
from .context import Context
from .measure import BF16_TOLERANCE, describe, free, peak_gb, rel_err, repeat, reset_peak, resident_gb, sync, timed
from .report import Row

SECTION = "wan"
PROMPT = "a man walking through a forest in the rain, slow motion video, fog"
SEED = 7
GUIDANCE = TIER_DEFAULTS["fast"][1]
VIDEO_TARGET_S, IMAGE_TARGET_S = 24.0, 1.5


class AdoptedModels(WanModels):
    """``WanModels`` whose ``load()`` takes an already built pipeline (random weights) instead of a folder."""

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype, settings: WanSettings):
        super().__init__(model_path=None, device=str(device), batched_cfg=settings.wan_batched_cfg,
                         cuda_graphs=settings.cuda_graphs, compile_blocks=settings.compile_blocks,
                         fuse_qkv=settings.wan_fuse_qkv)
        self._built, self._built_dtype = pipe, dtype

    def load(self, which: str = "all") -> str:
        with self._lock:
            self.device, self.dtype = self._built.transformer.device, self._built_dtype
            self._adopt_t2v(self._built)
            return "adopted the built pipeline"


class StepClock:
    """Timestamps (after a device sync) of each finished denoising step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started = time.perf_counter()
        self.steps: list[float] = []
        self.marks: dict[str, float] = {}

    def step(self) -> None:
        sync(self.device)
        self.steps.append(time.perf_counter() - self.started)

    def progress(self, _fraction: float, message: str) -> None:
        if message.startswith("step "):
            self.step()
        else:
            self.marks.setdefault(message, time.perf_counter() - self.started)

    def per_step(self) -> float | None:
        gaps = [b - a for a, b in zip(self.steps, self.steps[1:])]
        return statistics.median(gaps) if gaps else None


def job(kind: str, width: int, height: int, steps: int, frames: int):
    config: dict[str, Any] = {"size": f"{width}*{height}", "seed": SEED, "num_inference_steps": steps}
    if kind == "video":
        config["frame_num"] = frames
    body = {"id": f"bench-{kind}", "type": f"{kind}_fast", "user_id": "bench", "prompt": PROMPT, "config": config,
            "metadata": {}}
    return decode(json.dumps(body))


def baseline_call(pipe: Any, width: int, height: int, frames: int, steps: int,
                  on_step: Callable[[], None] | None = None) -> np.ndarray:
    kwargs: dict[str, Any] = dict(prompt=PROMPT, negative_prompt="", height=height, width=width, num_frames=frames,
                                  num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                                  generator=torch.Generator("cpu").manual_seed(SEED))
    if on_step is not None:
        kwargs["callback_on_step_end"] = lambda _pipe, _i, _t, _tensors: (on_step(), {})[1]
    return pipe(**kwargs).frames[0]


def run(ctx: Context) -> None:
    p, dev = ctx.profile, ctx.profile.device
    started = time.perf_counter()
    pipe = ctx.step(SECTION, "build", 60, lambda: models.wan(p))
    if pipe is None:
        return
    ctx.report.detail(SECTION, "build_s", round(time.perf_counter() - started, 1))
    ctx.report.detail(SECTION, "parameters_m", {n: round(models.parameters(getattr(pipe, n)) / 1e6, 1)
                                                for n in ("transformer", "vae", "text_encoder")})
    ctx.report.detail(SECTION, "resident_gb", resident_gb(dev))
    w, h = p.wan_width, p.wan_height
    base: dict[str, dict] = {}

    ctx.step(SECTION, "baseline warm-up", 10, lambda: baseline_call(pipe, w, h, 1, p.warm_steps))

    def baseline_image():
        reset_peak(dev)
        median, all_s, frames, latents = repeat(lambda: baseline_call(pipe, w, h, 1, p.wan_image_steps), dev,
                                                p.repeats, tap=pipe.vae.post_quant_conv)
        base["image"] = {"s": median, "frames": to_uint8(frames), "latents": latents, "peak": peak_gb(dev)}
        ctx.report.detail(SECTION, "baseline_image", {"s": all_s, "peak_gb": peak_gb(dev)})
    ctx.step(SECTION, "baseline image", 8, baseline_image)

    def baseline_video():
        reset_peak(dev)
        clock = StepClock(dev)
        _, all_s, _, latents = repeat(lambda: baseline_call(pipe, w, h, p.wan_frames, p.wan_video_steps,
                                                            clock.step), dev, 1, tap=pipe.vae.post_quant_conv)
        base["video"] = _video_numbers(p, all_s[0], clock) | {"latents": latents, "peak": peak_gb(dev)}
        ctx.report.detail(SECTION, "baseline_video", _public(base["video"]))
    ctx.step(SECTION, "baseline video", 20, baseline_video)
    if not _library(ctx, pipe, base):
        ctx.report.detail(SECTION, "ours_skipped", "the library recipe could not be undone on the shared pipeline")
        return

    def make_handler():
        settings = WanSettings(device=dev.type)   # the worker's defaults
        handler = WanHandler(settings, models=AdoptedModels(pipe, dev, p.bf16, settings))
        setup_s, _ = timed(handler.setup, dev)   # includes compiling the transformer blocks (COMPILE_BLOCKS)
        ctx.report.detail(SECTION, "handler_setup_s", round(setup_s, 2))
        ctx.report.detail(SECTION, "ours_batched_cfg", handler.status()["batched_cfg"])  # WAN_BATCHED_CFG
        return handler
    handler = ctx.step(SECTION, "handler setup", 20, make_handler)
    if handler is None:
        return
    ctx.step(SECTION, "ours warm-up", 10,
             lambda: handler.run(job("image", w, h, p.warm_steps, 1), lambda f, m: None))
    ours_image = ctx.step(SECTION, "ours image", 10, lambda: _ours_image(ctx, handler, pipe, base.get("image")))
    ctx.step(SECTION, "ours video", 25, lambda: _ours_video(ctx, handler, pipe, base.get("video")))
    ctx.step(SECTION, "to_uint8", 5, lambda: _to_uint8(ctx))
    ctx.report.detail(SECTION, "handler_status_after", handler.status())
    if ours_image is not None and "image" in base:
        ctx.step(SECTION, "fp32 reference", 20, lambda: _against_fp32(ctx, pipe, base["image"], ours_image))
    handler = pipe = None  # drop the references (free the memory) before what follows
    free(dev)
    ctx.step(SECTION, "WAN_FUSE_QKV", 60, lambda: _fused(ctx, base.get("video")))


def _fused(ctx: Context, base: dict | None) -> None:
    """``WAN_FUSE_QKV=1`` (not default): a fresh pipeline and handler with the attention projections fused, the
    video's CFG step against eager, ours (the default) and diffusers' recipe (which fuses them too)."""
    p, dev = ctx.profile, ctx.profile.device
    pipe = models.wan(p)
    settings = WanSettings(device=dev.type, wan_fuse_qkv=True)
    handler = WanHandler(settings, models=AdoptedModels(pipe, dev, p.bf16, settings))
    setup_s, _ = timed(handler.setup, dev)
    handler.run(job("image", p.wan_width, p.wan_height, p.warm_steps, 1), lambda f, m: None)
    clock = StepClock(dev)
    the_job = job("video", p.wan_width, p.wan_height, p.wan_video_steps, p.wan_frames)
    _, all_s, _, latents = repeat(lambda: handler.run(the_job, clock.progress), dev, 1, tap=pipe.vae.post_quant_conv)
    fused = _video_numbers(p, all_s[0], clock)
    ctx.report.detail(SECTION, "fused_qkv_video", fused | {"setup_s": round(setup_s, 2), "peak_gb": peak_gb(dev)})
    default = next((r.ours for r in ctx.report.rows if r.key == "wan_video_step"), None)
    ctx.report.add(Row("wan_video_step_fused_qkv", f"WAN {p.wan_frames} frames, one CFG step, WAN_FUSE_QKV=1", "s",
                       baseline=base and base.get("per_step_s"), ours=fused.get("per_step_s"),
                       note=f"set-up {setup_s:.1f} s; default ours {default}"))
    library = next((r.library for r in ctx.report.rows if r.key == "wan_video_step"), None)
    if library is not None:
        ctx.report.library("wan_video_step_fused_qkv", library, peers.WAN_NOTE)
    if base is not None and base.get("latents") is not None:
        err = rel_err(latents, base["latents"])
        ctx.report.check(f"WAN_FUSE_QKV {p.wan_frames} frames latents", err <= BF16_TOLERANCE, f"rel err {err:.2e}")
    handler = pipe = None  # drop the references (free the memory) before what follows
    free(dev)


def _library(ctx: Context, pipe: Any, base: dict[str, dict]) -> bool:
    """diffusers' recipe on the baseline's pipeline and cases, the 1-frame and the video shape compiled before
    timing; False when the pipeline could not be put back as the baseline left it."""
    p, dev = ctx.profile, ctx.profile.device
    w, h = p.wan_width, p.wan_height

    def reference() -> torch.Tensor:
        return repeat(lambda: baseline_call(pipe, w, h, 1, p.warm_steps), dev, 1, tap=pipe.vae.post_quant_conv)[3]

    def warm() -> None:
        baseline_call(pipe, w, h, 1, p.warm_steps)
        baseline_call(pipe, w, h, p.wan_frames, p.warm_steps)

    measures = [("library image", 8, lambda: _library_image(ctx, pipe, base.get("image"))),
                ("library video", 20, lambda: _library_video(ctx, pipe, base.get("video")))]
    return peers.run(ctx, SECTION, peers.wan_recipe(pipe), reference, warm, measures, warm_needs=50)


def _library_image(ctx: Context, pipe: Any, base: dict | None) -> None:
    p, dev = ctx.profile, ctx.profile.device
    reset_peak(dev)
    median, all_s, frames, latents = repeat(
        lambda: baseline_call(pipe, p.wan_width, p.wan_height, 1, p.wan_image_steps), dev, p.repeats,
        tap=pipe.vae.post_quant_conv)
    errors = peers.compare(ctx, "WAN 1 frame", latents, base and base["latents"], to_uint8(frames),
                           base and base["frames"])
    ctx.report.detail(SECTION, "library_image", {"s": all_s, "peak_gb": peak_gb(dev)} | errors)
    ctx.report.library("wan_image", round(median, 3), peers.WAN_NOTE)


def _library_video(ctx: Context, pipe: Any, base: dict | None) -> None:
    p, dev = ctx.profile, ctx.profile.device
    reset_peak(dev)
    clock = StepClock(dev)
    _, all_s, _, latents = repeat(lambda: baseline_call(pipe, p.wan_width, p.wan_height, p.wan_frames,
                                                        p.wan_video_steps, clock.step), dev, 1,
                                  tap=pipe.vae.post_quant_conv)
    numbers = _video_numbers(p, all_s[0], clock)
    errors = peers.compare(ctx, f"WAN {p.wan_frames} frames", latents, base and base["latents"])
    ctx.report.detail(SECTION, "library_video", numbers | {"peak_gb": peak_gb(dev)} | errors)
    if "extrapolated_s" in numbers:
        ctx.report.library("wan_video", numbers["extrapolated_s"],
                           f"{peers.WAN_NOTE}; extrapolated from {p.wan_video_steps} steps as the baseline")
        ctx.report.library("wan_video_step", numbers["per_step_s"], peers.WAN_NOTE)


def _to_uint8(ctx: Context) -> None:
    """The handler's CPU conversion of the pipeline's float32 frames, alone (it runs between decode and MP4)."""
    p = ctx.profile
    frames = np.random.default_rng(0).random((p.wan_frames, p.wan_height, p.wan_width, 3), dtype=np.float32)
    seconds, _ = timed(lambda: to_uint8(frames), torch.device("cpu"))
    ctx.report.detail(SECTION, "to_uint8_s", round(seconds, 3))


def _video_numbers(p, total: float, clock: StepClock) -> dict[str, Any]:
    step = clock.per_step()
    if step is None:
        return {"measured_s": total, "steps": p.wan_video_steps}
    fixed = total - p.wan_video_steps * step
    return {"measured_s": round(total, 3), "steps": p.wan_video_steps, "per_step_s": round(step, 4),
            "fixed_s": round(fixed, 3), "extrapolated_s": round(fixed + p.wan_full_steps * step, 3),
            "step_marks_s": [round(s, 3) for s in clock.steps],
            "marks_s": {k: round(v, 3) for k, v in clock.marks.items()}}


def _public(numbers: dict) -> dict:
    return {k: v for k, v in numbers.items() if k not in ("latents", "frames")}


def _ours_image(ctx: Context, handler: WanHandler, pipe: Any, base: dict | None) -> torch.Tensor | None:
    p, dev = ctx.profile, ctx.profile.device
    reset_peak(dev)
    the_job = job("image", p.wan_width, p.wan_height, p.wan_image_steps, 1)
    median, all_s, result, latents = repeat(lambda: handler.run(the_job, lambda f, m: None), dev, p.repeats,
                                            tap=pipe.vae.post_quant_conv)
    ctx.report.detail(SECTION, "ours_image", {"s": all_s, "peak_gb": peak_gb(dev),
                                              "generation_time": result.metadata["generation_time"]})
    ours = latents
    ctx.report.add(Row("wan_image", f"WAN {p.wan_width}×{p.wan_height} 1 frame, {p.wan_image_steps} steps, CFG", "s",
                       baseline=base and round(base["s"], 3), ours=round(median, 3), peak_gb=peak_gb(dev),
                       note="handler.run incl. PNG encode"),
                   ("<=", IMAGE_TARGET_S) if p.full else None)
    if base is None:
        return ours
    err = rel_err(latents, base["latents"])
    ctx.report.check("WAN 1 frame latents", err <= BF16_TOLERANCE, f"rel err {err:.2e} ({describe(latents)})")
    with Image.open(io.BytesIO(result.outputs[0].data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    err = rel_err(pixels, base["frames"][0])
    ctx.report.check("WAN 1 frame image", err <= BF16_TOLERANCE,
                     f"rel err {err:.2e}, max |Δpixel| {int(np.abs(pixels.astype(int) - base['frames'][0]).max())}")
    return ours


def _against_fp32(ctx: Context, pipe: Any, base: dict, ours: torch.Tensor) -> None:
    """The single frame once more with the transformer in fp32 (no TF32; plain blocks, no graphs): how far the
    bf16 baseline and ours each are from the exact trajectory. Ours passes if it is no further than 1.25 x the
    baseline + 1e-5 (fp32 rounding, for the all-fp32 CPU run); bound written down before the run that first
    measured it. Last in the section: it leaves the
    shared transformer in fp32."""
    p, dev = ctx.profile, ctx.profile.device
    graphed.uninstall(pipe.transformer)
    regional.uncompile_blocks(pipe.transformer)
    pipe.transformer.float()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _, _, _, exact = repeat(lambda: baseline_call(pipe, p.wan_width, p.wan_height, 1, p.wan_image_steps), dev, 1,
                                tap=pipe.vae.post_quant_conv)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    base_err, ours_err = rel_err(base["latents"], exact), rel_err(ours, exact)
    ctx.report.detail(SECTION, "image_latents_rel_err_to_fp32", {"baseline": base_err, "ours": ours_err})
    ctx.report.check("WAN 1 frame latents against fp32", ours_err <= 1.25 * base_err + 1e-5,
                     f"ours {ours_err:.2e} vs the bf16 baseline's {base_err:.2e} (bound 1.25x + 1e-5)")


def _ours_video(ctx: Context, handler: WanHandler, pipe: Any, base: dict | None) -> None:
    p, dev = ctx.profile, ctx.profile.device
    reset_peak(dev)
    clock = StepClock(dev)
    the_job = job("video", p.wan_width, p.wan_height, p.wan_video_steps, p.wan_frames)
    _, all_s, result, latents = repeat(lambda: handler.run(the_job, clock.progress), dev, 1,
                                       tap=pipe.vae.post_quant_conv)
    ours = _video_numbers(p, all_s[0], clock)
    encode = all_s[0] - ours["marks_s"].get("encoding", all_s[0]) if "marks_s" in ours else None
    ctx.report.detail(SECTION, "ours_video", ours | {"peak_gb": peak_gb(dev), "mp4_encode_s": encode,
                                                      "frames": result.metadata.get("frame_num"),
                                                      "generation_time": result.metadata["generation_time"]})
    extrapolated = f"extrapolated from {p.wan_video_steps} measured steps"
    ctx.report.add(Row("wan_video", f"WAN {p.wan_width}×{p.wan_height} {p.wan_frames} frames, {p.wan_full_steps} "
                       "steps, CFG", "s", baseline=base and base.get("extrapolated_s"),
                       ours=ours.get("extrapolated_s"), peak_gb=peak_gb(dev),
                       note=f"{extrapolated}; ours incl. MP4 encode"),
                   ("<=", VIDEO_TARGET_S) if p.full else None)
    ctx.report.add(Row("wan_video_step", f"WAN {p.wan_frames} frames, one CFG step (2 transformer passes)", "s",
                       baseline=base and base.get("per_step_s"), ours=ours.get("per_step_s")))
    if base is None:
        return
    err = rel_err(latents, base["latents"])
    ctx.report.check(f"WAN {p.wan_frames} frames latents", err <= BF16_TOLERANCE,
                     f"rel err {err:.2e} ({describe(latents)})")

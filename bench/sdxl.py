"""SDXL: the handler's ``run()`` (job in, PNGs out) next to a plain ``StableDiffusionXLPipeline`` call on
the same modules, same prompt, seeds and guidance.

The baseline runs first (before ``SdxlPipelines.from_t2i`` turns on VAE slicing and installs the UNet's CUDA
graphs); then the handler gets the same pipeline through its ``loader`` injection point, with the worker's
default settings (its ``setup()`` time, which captures the warm-up shapes' graphs, is recorded). The latents
entering the VAE decoder are captured on the last timed run of each (a copy on the device, no
synchronisation) and compared, and so are the images. Between the two, diffusers' own recipe (bench/peers.py:
channels-last UNet, fused QKV, ``compile_repeated_blocks(fullgraph=True)``) runs the baseline's cases on the same
pipeline, is compared with the baseline the same way, and is undone before the handler gets the pipeline.
``compiled`` is the ``TORCH_COMPILE=1`` variant (not on by default), measured only when time is left.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from PIL import Image

from workers.core.job import decode
from workers.media import png
from workers.sdxl import SdxlHandler
from workers.sdxl.pipeline import SdxlPipelines
from workers.sdxl.request import TIER_DEFAULTS
from workers.sdxl.settings import SdxlSettings

from . import models, peers
from .context import Context
from .measure import BF16_TOLERANCE, describe, free, peak_gb, rel_err, repeat, reset_peak, resident_gb, sync, timed
from .report import Row

SECTION = "sdxl"
PROMPT = "a cat sitting on a red chair"
NEGATIVE = "blurry"
SEED = 7
TARGETS = {(15, 1): 0.8, (15, 6): 2.4, (25, 1): 1.3}   # seconds, H100 (issue 7)
PEAK_TARGET_GB = 20.0                                  # 6 images
SECONDS = {(15, 1): 2.2, (15, 6): 5.0, (25, 1): 3.2}     # expected eager seconds per call (for the deadline)


def no_progress(_fraction: float, _message: str) -> None:
    pass


def tier(steps: int) -> tuple[str, float]:
    """The job type whose default matches ``steps`` (25: high) and its guidance scale."""
    name = "high" if steps >= 25 else "fast"
    return f"sdxl_image_{name}", TIER_DEFAULTS[name][1]


def job(side: int, steps: int, images: int):
    job_type, _ = tier(steps)
    body = {"id": f"bench-{steps}x{images}", "type": job_type, "user_id": "bench", "prompt": PROMPT,
            "negative_prompt": NEGATIVE, "metadata": {},
            "config": {"num_images": images, "num_inference_steps": steps, "seed": SEED,
                       "resolution": f"{side}x{side}"}}
    return decode(json.dumps(body))


def baseline_call(pipe, side: int, steps: int, images: int) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(images)]
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=tier(steps)[1],
                width=side, height=side, num_images_per_prompt=images, generator=generators).images


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def label(steps: int, images: int, side: int) -> str:
    return f"SDXL {side}² {steps} steps, {images} image{'s' if images > 1 else ''}"


def run(ctx: Context) -> None:
    p, dev = ctx.profile, ctx.profile.device
    started = time.perf_counter()
    pipe = ctx.step(SECTION, "build", 40, lambda: models.sdxl(p))
    if pipe is None:
        return
    ctx.report.detail(SECTION, "build_s", round(time.perf_counter() - started, 1))
    ctx.report.detail(SECTION, "parameters_m", {n: round(models.parameters(getattr(pipe, n)) / 1e6, 1)
                                                for n in ("unet", "vae", "text_encoder", "text_encoder_2")})
    ctx.report.detail(SECTION, "resident_gb", resident_gb(dev))
    batches = sorted({n for _, n in p.sdxl_cases})
    base: dict[tuple[int, int], dict] = {}

    ctx.step(
        SECTION, "baseline warm-up", 10, lambda: [baseline_call(pipe, p.sdxl_side, p.warm_steps, n) for n in batches]
    )
    for steps, n in p.sdxl_cases:
        def measure_baseline(steps=steps, n=n):
            reset_peak(dev)
            median, all_s, images, latents = repeat(lambda: baseline_call(pipe, p.sdxl_side, steps, n), dev,
                                                    p.repeats, tap=pipe.vae.post_quant_conv)
            base[(steps, n)] = {"s": median, "all_s": all_s, "peak": peak_gb(dev), "latents": latents,
                                "images": [np.asarray(i.convert("RGB")) for i in images]}
            ctx.report.detail(SECTION, f"baseline_{steps}x{n}", {"s": all_s, "peak_gb": peak_gb(dev)})
        ctx.step(SECTION, f"baseline {steps}x{n}", SECONDS.get((steps, n), 5.0) * p.repeats + 5, measure_baseline)
    if not _library(ctx, pipe, base, batches):
        ctx.report.detail(SECTION, "ours_skipped", "the library recipe could not be undone on the shared pipeline")
        return

    def make_handler():
        settings = SdxlSettings(device=dev.type)   # the worker's defaults: compiled blocks and CUDA graphs on CUDA
        pipes = SdxlPipelines.from_t2i(pipe, dev, "sdxl-random", compile_unet=settings.torch_compile,
                                       cuda_graphs=settings.cuda_graphs, compile_blocks=settings.compile_blocks)
        handler = SdxlHandler(settings, loader=lambda _settings: pipes)
        setup_s, _ = timed(handler.setup, dev)   # includes capturing the warm-up shapes' graphs
        ctx.report.detail(SECTION, "handler_setup_s", round(setup_s, 2))
        ctx.report.detail(SECTION, "handler_status", handler.status())
        return handler

    handler = ctx.step(SECTION, "handler setup", 25, make_handler)
    if handler is None:
        return
    ctx.step(SECTION, "ours warm-up", 10,
             lambda: [handler.run(job(p.sdxl_side, p.warm_steps, n), no_progress) for n in batches])
    for steps, n in p.sdxl_cases:
        ctx.step(SECTION, f"ours {steps}x{n}", SECONDS.get((steps, n), 5.0) * p.repeats + 8,
                 lambda steps=steps, n=n: _measure_ours(ctx, handler, pipe, base.get((steps, n)), steps, n))
    ctx.step(SECTION, "after the last step", 10, lambda: _after_last_step(ctx, pipe))
    ctx.shared["sdxl_latents_15x1"] = base.get(p.sdxl_cases[0], {}).get("latents")
    ctx.report.detail(SECTION, "handler_status_after", handler.status())
    handler = pipe = None  # drop the references (free the memory) before what follows
    free(dev)
    ctx.step(SECTION, "SDXL_COMPILE_RESNETS", 120, lambda: _resnets(ctx, base))


def _resnets(ctx: Context, base: dict[tuple[int, int], dict]) -> None:
    """``SDXL_COMPILE_RESNETS=1`` (not default): a fresh pipeline, the handler set up with the ResNet blocks
    compiled as well (its set-up seconds are the start-up cost), 15x1 and 15x6 against eager and against ours."""
    p, dev = ctx.profile, ctx.profile.device
    settings = SdxlSettings(device=dev.type, sdxl_compile_resnets=True)
    pipes = SdxlPipelines.from_t2i(models.sdxl(p), dev, "sdxl-random", cuda_graphs=settings.cuda_graphs,
                                   compile_blocks=settings.compile_blocks, compile_resnets=True)
    handler = SdxlHandler(settings, loader=lambda _settings: pipes)
    setup_s, _ = timed(handler.setup, dev)
    ctx.report.detail(SECTION, "resnets_setup_s", round(setup_s, 2))
    ctx.report.detail(SECTION, "resnets_compiled_blocks", pipes.compiled_blocks)
    for steps, n in (p.sdxl_cases[0], p.sdxl_cases[1]):
        median, all_s, _, latents = repeat(lambda steps=steps, n=n: handler.run(job(p.sdxl_side, steps, n),
                                                                                 no_progress),
                                           dev, p.repeats, tap=pipes.t2i.vae.post_quant_conv)
        default = next((r.ours for r in ctx.report.rows if r.key == f"sdxl_{steps}x{n}"), None)
        eager = base.get((steps, n), {})
        ctx.report.add(Row(f"sdxl_resnets_{steps}x{n}", label(steps, n, p.sdxl_side) + ", SDXL_COMPILE_RESNETS=1",
                           "s", baseline=eager.get("s") and round(eager["s"], 3), ours=round(median, 3),
                           peak_gb=peak_gb(dev), note=f"set-up {setup_s:.1f} s (compile); default ours {default}"))
        ctx.report.detail(SECTION, f"resnets_{steps}x{n}", {"s": all_s})
        if eager.get("latents") is not None:
            err = rel_err(latents, eager["latents"])
            ctx.report.check(f"SDXL_COMPILE_RESNETS {steps}x{n} latents", err <= BF16_TOLERANCE, f"rel err {err:.2e}")
    handler = pipes = None  # drop the references (free the memory) before what follows
    free(dev)


def _library(ctx: Context, pipe, base: dict[tuple[int, int], dict], batches: list[int]) -> bool:
    """diffusers' recipe on the baseline's pipeline and cases, every batch shape compiled before timing; False
    when the pipeline could not be put back as the baseline left it."""
    p, dev = ctx.profile, ctx.profile.device

    def reference() -> torch.Tensor:
        return repeat(lambda: baseline_call(pipe, p.sdxl_side, p.warm_steps, 1), dev, 1,
                      tap=pipe.vae.post_quant_conv)[3]

    def warm() -> None:
        for n in batches:
            baseline_call(pipe, p.sdxl_side, p.warm_steps, n)

    measures = [(f"library {steps}x{n}", SECONDS.get((steps, n), 5.0) * p.repeats + 5,
                 lambda steps=steps, n=n: _measure_library(ctx, pipe, base.get((steps, n)), steps, n))
                for steps, n in p.sdxl_cases]
    return peers.run(ctx, SECTION, peers.sdxl_recipe(pipe), reference, warm, measures, warm_needs=60)


def _measure_library(ctx: Context, pipe, base: dict | None, steps: int, n: int) -> None:
    p, dev = ctx.profile, ctx.profile.device
    reset_peak(dev)
    median, all_s, images, latents = repeat(lambda: baseline_call(pipe, p.sdxl_side, steps, n), dev, p.repeats,
                                            tap=pipe.vae.post_quant_conv)
    peak = peak_gb(dev)
    pixels = np.stack([np.asarray(i.convert("RGB")) for i in images])
    errors = peers.compare(ctx, f"SDXL {steps}x{n}", latents, base and base["latents"], pixels,
                           base and np.stack(base["images"]))
    ctx.report.detail(SECTION, f"library_{steps}x{n}", {"s": all_s, "peak_gb": peak} | errors)
    ctx.report.library(f"sdxl_{steps}x{n}", round(median, 3), peers.SDXL_NOTE)
    ctx.shared[f"sdxl_library_{steps}x{n}"] = round(median, 3)
    if n == max(c[1] for c in p.sdxl_cases) and peak is not None:
        ctx.report.library(f"sdxl_peak_{n}", peak, peers.SDXL_NOTE)


def _measure_ours(ctx: Context, handler: SdxlHandler, pipe, base: dict | None, steps: int, n: int) -> None:
    p, dev = ctx.profile, ctx.profile.device
    reset_peak(dev)
    median, all_s, result, latents = repeat(lambda: handler.run(job(p.sdxl_side, steps, n), no_progress), dev,
                                            p.repeats, tap=pipe.vae.post_quant_conv)
    peak = peak_gb(dev)
    ctx.report.detail(SECTION, f"ours_{steps}x{n}", {"s": all_s, "peak_gb": peak,
                                                     "generation_time": result.metadata["generation_time"],
                                                     "batch_size": result.metadata["batch_size"],
                                                     "latents": describe(latents)})
    target = TARGETS.get((steps, n)) if p.full else None
    ctx.report.add(Row(f"sdxl_{steps}x{n}", label(steps, n, p.sdxl_side), "s",
                       baseline=base and round(base["s"], 3), ours=round(median, 3), peak_gb=peak,
                       note="handler.run incl. PNG+thumbnail encode"),
                   ("<=", target) if target else None)
    if n == max(c[1] for c in p.sdxl_cases):
        ctx.report.add(Row(f"sdxl_peak_{n}", f"SDXL peak VRAM, {n} images", "GB",
                           baseline=base and base["peak"], ours=peak),
                       ("<=", PEAK_TARGET_GB) if p.full and n == 6 else None)
    if n == 1:
        ctx.report.detail(SECTION, f"ours_phases_{steps}x{n}", _phases(handler, job(p.sdxl_side, steps, n), dev))
    if base is None:
        return
    latent_err = rel_err(latents, base["latents"])
    ctx.report.check(f"SDXL {steps}x{n} latents", latent_err <= BF16_TOLERANCE,
                     f"rel err {latent_err:.2e} (ours {describe(latents)}, baseline finite "
                     f"{describe(base['latents'])['finite']})")
    ours_images = np.stack([png_array(o.data) for o in result.outputs])
    base_images = np.stack(base["images"])
    image_err = rel_err(ours_images, base_images)
    max_diff = int(np.abs(ours_images.astype(int) - base_images.astype(int)).max())
    ctx.report.check(f"SDXL {steps}x{n} images", image_err <= BF16_TOLERANCE,
                     f"rel err {image_err:.2e}, max |Δpixel| {max_diff}/255, pixel std {base_images.std():.1f}")


def _phases(handler: SdxlHandler, the_job, dev: torch.device) -> dict[str, float]:
    """Where one job's time goes: start to the end of step 1 (text encoding + one step), the median step,
    and the last step to the end (VAE decode, PIL, PNG + thumbnail encode). Each mark after a sync."""
    marks: list[float] = []
    sync(dev)
    started = time.perf_counter()

    def progress(_fraction: float, _message: str) -> None:
        sync(dev)
        marks.append(time.perf_counter() - started)
    handler.run(the_job, progress)
    sync(dev)
    total = time.perf_counter() - started
    gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
    return {"total_s": round(total, 4), "to_first_step_s": round(marks[0], 4) if marks else None,
            "median_step_s": round(gaps[len(gaps) // 2], 4) if gaps else None,
            "after_last_step_s": round(total - marks[-1], 4) if marks else None}


def _after_last_step(ctx: Context, pipe) -> None:
    """What one image costs after its last denoising step, piece by piece, as the pipeline and handler do it:
    the VAE's cast to fp32 and back (``force_upcast``), the fp32 decode, PIL conversion, PNG and thumbnail;
    and for comparison the decode with a channels-last VAE (same math, other kernels), Pillow's one-core PNG
    writer (what the handler used before workers/media/png.py), and the handler's encoding of 6 images."""
    from workers.media.thumbnail import thumbnail
    from workers.sdxl.images import encode_outputs, to_pil

    dev, vae, dtype = ctx.profile.device, pipe.vae, pipe.vae.dtype
    side = ctx.profile.sdxl_side // 8
    latents = torch.randn(1, 4, side, side, generator=torch.Generator(dev).manual_seed(0), device=dev,
                          dtype=dtype) * 0.5
    results: dict[str, object] = {}

    def best(fn) -> float:
        fn()
        return round(min(timed(fn, dev)[0] for _ in range(3)), 4)

    with torch.inference_mode():
        results["cast_fp32_and_back_s"] = best(lambda: (vae.to(torch.float32), vae.to(dtype)))
        vae.to(torch.float32)
        try:
            decode = lambda: vae.decode(latents.float(), return_dict=False)[0]  # noqa: E731
            results["decode_fp32_s"] = best(decode)
            image = decode()
            results["to_pil_s"] = best(lambda: pipe.image_processor.postprocess(image, output_type="pil"))
            results["to_pil_on_device_s"] = best(
                lambda: to_pil(pipe.image_processor.postprocess(image, output_type="pt")))   # the handler's
            vae.to(memory_format=torch.channels_last)
            results["decode_fp32_channels_last_s"] = best(decode)
            results["channels_last_rel_err"] = rel_err(decode(), image)
        finally:
            vae.to(dtype=dtype, memory_format=torch.contiguous_format)
    pil = pipe.image_processor.postprocess(image, output_type="pil")[0]
    results["png_s"] = best(lambda: png.encode(np.asarray(pil)))
    results["png_pillow_s"] = best(lambda: _pillow_png(pil))
    results["png_bytes"], results["png_pillow_bytes"] = len(png.encode(np.asarray(pil))), len(_pillow_png(pil))
    results["encode_6_images_with_thumbnails_s"] = best(lambda: encode_outputs([pil] * 6))
    results["encode_threads"] = png.threads()
    results["thumbnail_s"] = best(lambda: thumbnail(pil))
    ctx.report.detail(SECTION, "after_last_step", results)


def _pillow_png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=png.LEVEL)
    return out.getvalue()


def compiled(ctx: Context) -> None:
    """``TORCH_COMPILE=1``: the UNet compiled in place (static shapes). The handler's ``setup()`` would
    warm up three batch shapes (~290 s); here only the first case is compiled, by its first job."""
    p, dev = ctx.profile, ctx.profile.device
    steps, n = p.sdxl_cases[0]

    def measure():
        pipes = SdxlPipelines.from_t2i(models.sdxl(p), dev, "sdxl-random", compile_unet=True)
        handler = SdxlHandler(SdxlSettings(device=dev.type, torch_compile=True), loader=lambda _settings: pipes)
        first, _ = timed(lambda: handler.run(job(p.sdxl_side, steps, n), no_progress), dev)
        reset_peak(dev)
        median, all_s, _, latents = repeat(lambda: handler.run(job(p.sdxl_side, steps, n), no_progress), dev,
                                           p.repeats, tap=pipes.t2i.vae.post_quant_conv)
        ctx.report.detail("sdxl_compiled", f"{steps}x{n}", {"first_job_s": round(first, 1), "s": all_s})
        eager = next((r for r in ctx.report.rows if r.key == f"sdxl_{steps}x{n}"), None)
        if f"sdxl_library_{steps}x{n}" in ctx.shared:
            ctx.report.library(f"sdxl_compiled_{steps}x{n}", ctx.shared[f"sdxl_library_{steps}x{n}"], peers.SDXL_NOTE)
        target = TARGETS.get((steps, n)) if p.full else None
        ctx.report.add(Row(f"sdxl_compiled_{steps}x{n}", label(steps, n, p.sdxl_side) + ", TORCH_COMPILE=1",
                           "s", baseline=eager.baseline if eager else None, ours=round(median, 3),
                           peak_gb=peak_gb(dev), note=f"first job (compile) {first:.0f} s"),
                       ("<=", target) if target else None)
        reference = ctx.shared.get("sdxl_latents_15x1")
        if reference is not None:
            err = rel_err(latents, reference)
            ctx.report.check(f"SDXL compiled {steps}x{n} latents", err <= BF16_TOLERANCE, f"rel err {err:.2e}")
        handler = pipes = None  # drop the references (free the memory) before what follows
        free(dev)

    ctx.step("sdxl_compiled", f"compile {steps}x{n}", 170, measure)

"""The SDXL image handler: one ``sdxl_queue`` job -> ``num_images`` PNGs (+ WebP thumbnails) and the
callback metadata of CONTRACT §4, with every effective value reported."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from common.errors import ConfigError
from common.settings import Settings
from workers.core.errors import ErrorType, FatalWorkerError, InvalidJob, RetryableError
from workers.core.handler import Output, Progress, Result
from workers.core.job import Job, Queue
from workers.core.references import ReferenceFetcher, reference_or_fallback

from . import pipeline
from .generation import Plan, generate
from .images import encode_outputs, letterbox
from .pipeline import SdxlPipelines
from .request import BATCH_SIZES, SdxlRequest, img2img_schedule

log = logging.getLogger(__name__)

MODEL_NAMES = ("all", "sdxl")


class SdxlHandler:
    queue = Queue.SDXL
    kind = "sdxl"

    def __init__(self, settings: Settings, fetcher: ReferenceFetcher | None = None,
                 loader: Callable[[Settings], SdxlPipelines] = pipeline.load,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.fetcher = fetcher or ReferenceFetcher(settings)
        self._loader = loader
        self._clock = clock
        self._lock = threading.RLock()
        self._pipes: SdxlPipelines | None = None
        self.jobs_done = 0
        self.images_done = 0

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        """Load the model (one retry with a fresh load) and warm up ``torch.compile`` when it is on."""
        try:
            self._warm(self._load())
        except RetryableError as exc:
            raise FatalWorkerError(exc.message) from None

    def load(self, which: str = "all") -> str:
        _check_which(which)
        with self._lock:
            if self._pipes is not None:
                return f"SDXL model {self._pipes.name} is already loaded"
            pipes = self._warm(self._load())
            return f"SDXL model {pipes.name} loaded on {pipes.device.type}"

    def _warm(self, pipes: SdxlPipelines) -> SdxlPipelines:
        if pipes.needs_warm_up:
            started = self._clock()
            pipes.warm_up()
            log.info("warm-up (%s) done in %.1f s", _warm_up_work(pipes), self._clock() - started)
        return pipes

    def unload(self, which: str = "all") -> str:
        _check_which(which)
        with self._lock:
            if self._pipes is None:
                return "SDXL model was not loaded"
            pipes, self._pipes = self._pipes, None
            pipes.close()
            return "SDXL model unloaded"

    def status(self) -> dict[str, Any]:
        pipes = self._pipes
        base: dict[str, Any] = {"kind": self.kind, "loaded": pipes is not None, "batch_sizes": list(BATCH_SIZES),
                                "jobs_done": self.jobs_done, "images_done": self.images_done}
        if pipes is None:
            return base | {"model": _configured_name(self.settings), "device": None, "dtype": None}
        return base | {"model": pipes.name, "device": pipes.device.type, "dtype": str(pipes.dtype).split(".")[-1],
                       "attention": pipes.attention, "torch_compile": pipes.compiled,
                       "compiled_blocks": pipes.compiled_blocks,
                       "cuda_graphs": pipes.describe_graphs(),
                       "shared_weights": pipes.i2i.unet is pipes.t2i.unet, "notes": list(pipes.notes)}

    # ------------------------------------------------------------------ jobs
    def run(self, job: Job, progress: Progress) -> Result:
        request = SdxlRequest.from_job(job, self.settings)
        reference, reference_error, letterboxed = self._reference(request)
        with self._lock:
            pipes = self._pipes or self._load()
            plan = _plan(request, reference)
            started = self._clock()
            pipes.restore()
            try:
                outcome = generate(pipes, plan, progress)
            finally:
                pipes.restore()
            elapsed = self._clock() - started
        outputs = _outputs(plan, outcome.images)
        metadata = _job_metadata(plan, outcome, reference_error, letterboxed, elapsed)
        self.jobs_done += 1
        self.images_done += len(outputs)
        return Result(outputs=outputs, metadata=metadata)

    def _reference(self, request: SdxlRequest) -> tuple[Any, str | None, bool]:
        if request.reference_url is None:
            return None, None, False
        image, error = reference_or_fallback(self.fetcher, request.reference_url,
                                             self.settings.reference_failure_policy)
        if image is None:
            log.warning("reference not used: %s", error)
            return None, error, False
        fitted, letterboxed = letterbox(image, request.width, request.height)
        return fitted, None, letterboxed

    def _load(self) -> SdxlPipelines:
        """Load with one retry; ``ConfigError`` is fatal at once, loader failures end as MODEL_LOAD_ERROR."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._pipes = self._loader(self.settings)
                    log.info("SDXL model %s loaded on %s (%s)", self._pipes.name, self._pipes.device,
                             self._pipes.dtype)
                    return self._pipes
                except ConfigError as exc:
                    raise FatalWorkerError(str(exc)) from None
                except Exception as exc:  # noqa: BLE001 - loader errors are untyped (diffusers, safetensors, torch)
                    log.error("loading the SDXL model failed (attempt %d): %s", attempt, exc)
            raise RetryableError("the SDXL model could not be loaded", ErrorType.MODEL_LOAD_ERROR, delay=5.0)


def _plan(request: SdxlRequest, reference: Any) -> Plan:
    if reference is None:
        return Plan(request=request, steps=request.steps, strength=None)
    schedule = img2img_schedule(request.steps, request.denoise_strength, request.exact_copy)
    return Plan(request=request, steps=schedule.steps, strength=schedule.strength, reference=reference)


def _outputs(plan: Plan, images: list[Any]) -> list[Output]:
    request = plan.request
    pngs, thumbs = encode_outputs(images)
    outputs = []
    for i, (image, data, thumb) in enumerate(zip(images, pngs, thumbs)):
        metadata = {"seed": request.seed + i, "width": image.width, "height": image.height,
                    "steps": plan.steps, "guidance_scale": request.guidance_scale, "format": "png",
                    "asset_index": i}
        if plan.strength is not None:
            metadata["denoise_strength"] = plan.strength
        outputs.append(Output(name=f"{i}.png", data=data, content_type="image/png", kind="image",
                              thumbnail=thumb, metadata=metadata))
    return outputs


def _job_metadata(plan: Plan, outcome: Any, reference_error: str | None, letterboxed: bool,
                  elapsed: float) -> dict[str, Any]:
    request = plan.request
    img2img = plan.strength is not None
    metadata: dict[str, Any] = {
        "job_type": request.job_type,
        "seed": request.seed,
        "seed_generated": request.seed_generated,
        "num_images": len(outcome.images),
        "steps": plan.steps,
        "num_inference_steps": plan.steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "batch_size": outcome.batch_size,
        "pipeline": "img2img" if img2img else "txt2img",
        "reference_mode": "img2img" if request.reference_url else "none",
        "reference_mode_applied": img2img,
        "exact_copy_mode": request.exact_copy and img2img,
        "negative_prompt_used": request.negative_prompt is not None and request.guidance_scale > 1.0,
        "compel_applied": request.compel_applied,
        "generation_time": round(elapsed, 3),
    }
    if request.requested_size:
        metadata["requested_resolution"] = request.requested_size
    if request.compel_requested and not request.compel_applied:
        metadata["compel_note"] = "no (term:weight) weight other than 1.0; prompt used as plain text"
    if reference_error:
        metadata["reference_error"] = reference_error
    if request.exact_copy and not img2img:
        metadata["exact_copy_note"] = "exact copy needs a usable reference image; generated from the prompt"
    if img2img:
        metadata.update(denoise_strength=plan.strength, denoise_strength_source=request.denoise_source,
                        denoising_steps=int(plan.steps * plan.strength), reference_letterboxed=letterboxed)
        if plan.steps != request.steps:
            metadata["requested_steps"] = request.steps
    if outcome.oom_retries:
        metadata["oom_retries"] = outcome.oom_retries
    return metadata


def _warm_up_work(pipes: SdxlPipelines) -> str:
    work = ["torch.compile of the UNet"] if pipes.compiled else []
    if pipes.compiled_blocks:
        work.append(f"torch.compile of {pipes.compiled_blocks} transformer blocks")
    if pipes.graphs:
        work.append("CUDA graph captures")
    return ", ".join(work)


def _check_which(which: str) -> None:
    if which not in MODEL_NAMES:
        raise InvalidJob(f"unknown model {which!r}; expected one of {', '.join(MODEL_NAMES)}")


def _configured_name(settings: Settings) -> str | None:
    return pipeline.model_name(settings.sdxl_model_path) if settings.sdxl_model_path else None

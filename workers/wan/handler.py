"""The WAN handler: one ``wan_queue`` job → references → prompt enhancement → generation → PNG or MP4.

The worker's job loop and ``wan_generate.py`` both run jobs through ``WanHandler.run``; only the reference
fetcher differs (the CLI also reads local files).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from common.settings import Settings
from workers.core.errors import InvalidJob
from workers.core.handler import Progress, Result
from workers.core.job import Job, Queue
from workers.core.references import ReferenceFetcher

from . import encode
from . import references as refs_mod
from .enhance import Enhancement, PromptEnhancer
from .pipeline import GenerationSpec, WanModels
from .request import FPS, WanRequest, from_job

log = logging.getLogger(__name__)

VACE_UNLOADED = "REFERENCE_FRAME_ERROR: the VACE model is unloaded; generated without reference frames"


class WanHandler:
    queue = Queue.WAN
    kind = "wan"

    def __init__(self, settings: Settings, models: WanModels | None = None,
                 enhancer: PromptEnhancer | None = None, fetcher: refs_mod.Fetcher | None = None,
                 reference_policy: str | None = None):
        self.settings = settings
        self.models = models or WanModels.from_settings(settings)
        self.enhancer = enhancer or PromptEnhancer.from_settings(settings)
        self.fetcher = fetcher or ReferenceFetcher(settings)
        self.reference_policy = reference_policy or settings.reference_failure_policy

    # -- Handler and ModelControl (its HTTP route: routes.py) ------------------------------------
    def setup(self) -> None:
        log.info("WAN: %s", self.models.load("all"))

    def load(self, which: str) -> str:
        return self.models.load(_which(which))

    def unload(self, which: str) -> str:
        return self.models.unload(_which(which))

    def status(self) -> dict[str, Any]:
        return {**self.models.status(), "fps": FPS, "native_sizes": ["832x480", "480x832", "624x624"],
                "reference_modes": [m.value for m in refs_mod.ReferenceMode],
                "enhancement": {"via": "chat worker /enhance", "model": "qwen_base"}}

    def run(self, job: Job, progress: Progress) -> Result:
        started = time.monotonic()
        request = from_job(job, self.settings.max_prompt_chars)
        progress(0.02, "fetching references")
        references = self._references(request)
        enhancement = self._enhance(request, progress)
        spec = GenerationSpec(prompt=enhancement.prompt if enhancement else request.prompt,
                              negative_prompt=request.negative_prompt, width=request.width,
                              height=request.height, num_frames=request.num_frames, steps=request.steps,
                              guidance_scale=request.guidance_scale, seed=request.seed, solver=request.solver,
                              shift=request.sample_shift)
        conditioning = (refs_mod.conditioning(references.images, spec.width, spec.height, spec.num_frames)
                        if references.applied else None)
        progress(0.1, "denoising")
        frames = self.models.generate(
            spec, conditioning, on_step=lambda done, total: progress(0.1 + 0.8 * done / total,
                                                                      f"step {done}/{total}"))
        generation_time = time.monotonic() - started
        progress(0.92, "encoding")
        asset_meta = {"seed": request.seed, "steps": request.steps, "guidance_scale": request.guidance_scale}
        outputs = encode.outputs(frames, request.is_video, asset_meta)
        metadata = job_metadata(job, request, references, enhancement, generation_time)
        if request.is_video:
            metadata.update(frame_num=outputs[0].metadata["frame_num"], fps=FPS,
                            duration_seconds=outputs[0].metadata["duration_seconds"])
        metadata["model"] = "wan2.1-vace" if conditioning is not None else "wan2.1-t2v"
        progress(1.0, "done")
        return Result(outputs, metadata)

    # -- steps ---------------------------------------------------------------------------------
    def _references(self, request: WanRequest) -> refs_mod.ReferenceOutcome:
        outcome = refs_mod.resolve(request.references, self.fetcher, self.reference_policy,
                                   self.models.vace_available)
        if outcome.error == refs_mod.NO_VACE and self.models.vace_path is not None:
            return refs_mod.ReferenceOutcome(outcome.mode, error=VACE_UNLOADED)
        return outcome

    def _enhance(self, request: WanRequest, progress: Progress) -> Enhancement | None:
        if not request.enhance:
            return None
        progress(0.05, "enhancing the prompt")
        return self.enhancer.try_enhance(request.prompt, request.enhance_instruction)


def job_metadata(job: Job, request: WanRequest, references: refs_mod.ReferenceOutcome,
                 enhancement: Enhancement | None, generation_time: float) -> dict[str, Any]:
    """Completed-job metadata (CONTRACT §4); never a key the app owns."""
    meta: dict[str, Any] = {
        "job_type": job.type.value, "seed": request.seed, "seed_was_random": request.seed_was_random,
        "num_images": 1, "batch_size": 1, "steps": request.steps, "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale, "width": request.width, "height": request.height,
        "size_source": request.size_source, "solver": request.solver.value,
        "sample_shift": request.sample_shift, "negative_prompt_used": bool(request.negative_prompt),
        **references.metadata(), "generation_time": round(generation_time, 3),
    }
    if request.solver_fallback is not None:
        meta["solver_fallback"] = request.solver_fallback
    if request.frames_requested is not None and request.frames_requested != request.num_frames:
        meta["frame_num_requested"] = request.frames_requested
    if enhancement is not None:
        meta.update(enhancement.metadata(request.prompt))
    return meta


def _which(which: str) -> str:
    """``vace`` (the VACE transformer only) or ``all``/``wan`` (everything); anything else is refused, so a
    typo never unloads more than was asked."""
    if which in ("all", "wan", "vace"):
        return "vace" if which == "vace" else "all"
    raise InvalidJob(f"'which' must be all, wan or vace, got {which[:32]!r}")

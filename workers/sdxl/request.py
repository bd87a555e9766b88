"""An ``sdxl_queue`` job decoded into the values generation uses (CONTRACT §2.1, first present field wins).

Every bad value is ``InvalidJob`` naming the field (``config.num_images must be a number, got 'six'``);
values the contract says to adjust (sizes to multiples of 8, ``num_images`` to 1/3/6, the img2img step
floor) are adjusted here or in :func:`img2img_schedule` and reported as the effective values.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from common.settings import Settings
from workers.core import params
from workers.core.errors import ErrorType, InvalidJob
from workers.core.job import Job, Queue
from workers.core.params import describe, finite_number

from . import weighting
from .weighting import Segment

TIER_DEFAULTS = {"fast": (15, 6.0), "high": (25, 7.5)}
DEFAULT_SIZE = 1024
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
BATCH_SIZES = (1, 3, 6)
MAX_SEED = 2 ** 63 - 1 - max(BATCH_SIZES)
MAX_URL_CHARS = 8192
DEFAULT_DENOISE_STRENGTH = 0.5   # img2img without any strength field
MIN_DENOISE_STRENGTH = 0.01      # lower values are raised (the step floor would need > 100 steps)
EXACT_COPY_STRENGTH = 0.05       # exact_copy_mode: one real step at the least-noisy timestep

STEPS_PATHS = ("config.num_inference_steps", "config.steps", "metadata.steps")
GUIDANCE_PATHS = ("config.guidance_scale", "metadata.guidance_scale")
NEGATIVE_PATHS = ("negative_prompt", "config.negative_prompt", "metadata.negative_prompt")
REFERENCE_PATHS = ("metadata.reference_image_url", "reference_image_url")
STRENGTH_PATHS = ("config.denoise_strength", "metadata.denoise_strength")


@dataclass(frozen=True)
class SdxlRequest:
    job_type: str
    prompt: str                         # the text fed to CLIP (compel weights appended when enabled)
    segments: tuple[Segment, ...]       # the same, parsed; weighted when ``compel_applied``
    compel_requested: bool
    compel_applied: bool
    negative_prompt: str | None
    negative_segments: tuple[Segment, ...]
    width: int
    height: int
    requested_size: str | None          # "WxH" as asked, when rounding changed it
    steps: int
    guidance_scale: float
    num_images: int
    seed: int
    seed_generated: bool
    reference_url: str | None
    denoise_strength: float             # requested (or default) img2img strength
    denoise_source: str
    exact_copy: bool

    @classmethod
    def from_job(cls, job: Job, settings: Settings) -> SdxlRequest:
        if job.queue is not Queue.SDXL:
            raise InvalidJob(f"job type {job.type.value} does not belong to sdxl_queue")
        steps_default, guidance_default = TIER_DEFAULTS.get(job.type.tier, TIER_DEFAULTS["fast"])
        limit = settings.max_prompt_chars
        prompt, segments, compel_applied = _prompt(job, limit)
        negative = _negative(job, limit)
        negative_segments = weighting.parse(negative, "negative_prompt") if negative and job.compel_enabled else ()
        if negative_segments:
            negative = weighting.plain_text(negative_segments)
        width, height, requested = _size(job)
        seed, generated = _seed(job)
        strength, source = _strength(job)
        return cls(
            job_type=job.type.value,
            prompt=prompt,
            segments=segments,
            compel_requested=job.compel_enabled,
            compel_applied=compel_applied,
            negative_prompt=negative,
            negative_segments=negative_segments,
            width=width,
            height=height,
            requested_size=requested,
            steps=params.integer(job, STEPS_PATHS, steps_default, 1, MAX_STEPS),
            guidance_scale=params.real(job, GUIDANCE_PATHS, guidance_default, 0.0, MAX_GUIDANCE),
            num_images=_num_images(job),
            seed=seed,
            seed_generated=generated,
            reference_url=_first_text(job, REFERENCE_PATHS, MAX_URL_CHARS),
            denoise_strength=strength,
            denoise_source=source,
            exact_copy=params.flag(job, ("metadata.exact_copy_mode", "config.exact_copy_mode")),
        )

    @property
    def negative_weighted(self) -> bool:
        return weighting.is_weighted(self.negative_segments)


@dataclass(frozen=True)
class Img2ImgSchedule:
    steps: int              # scheduler steps (num_inference_steps) actually used
    strength: float         # effective strength
    denoising_steps: int    # steps the pipeline really runs: int(steps * strength)


def img2img_schedule(steps: int, strength: float, exact_copy: bool) -> Img2ImgSchedule:
    """Effective img2img values: strength clamped to [0.01, 1] (exact copy: 0.05), and the step count raised
    until diffusers' ``int(steps * strength)`` is at least one real denoising step."""
    strength = EXACT_COPY_STRENGTH if exact_copy else min(max(strength, MIN_DENOISE_STRENGTH), 1.0)
    steps = max(steps, math.ceil(1.0 / strength))
    while int(steps * strength) < 1:  # float rounding (e.g. 0.07 * 14.99...)
        steps += 1
    return Img2ImgSchedule(steps, strength, min(int(steps * strength), steps))


def round_images(value: float) -> int:
    """CONTRACT §2.1: <=1 -> 1, <=3 -> 3, else 6."""
    for size in BATCH_SIZES:
        if value <= size:
            return size
    return BATCH_SIZES[-1]


def _prompt(job: Job, limit: int) -> tuple[str, tuple[Segment, ...], bool]:
    if len(job.prompt) > limit:
        raise InvalidJob(f"prompt is longer than {limit} characters ({len(job.prompt)})",
                         error_type=ErrorType.INVALID_PROMPT)
    if len(job.compel_weights) > limit:
        raise InvalidJob(f"compel_weights is longer than {limit} characters", error_type=ErrorType.INVALID_PROMPT)
    if not job.compel_enabled:
        return job.prompt, (Segment(job.prompt),) if job.prompt.strip() else (), False
    segments = weighting.join(weighting.parse(job.prompt, "prompt"),
                              weighting.parse(job.compel_weights, "compel_weights"))
    # ``(red:1.0)`` is plain ``red``: the syntax itself never reaches CLIP
    return weighting.plain_text(segments), segments, weighting.is_weighted(segments)


def _negative(job: Job, limit: int) -> str | None:
    return _first_text(job, NEGATIVE_PATHS, limit, ErrorType.INVALID_PROMPT)


def _first_text(job: Job, paths: tuple[str, ...], limit: int,
                error_type: ErrorType = ErrorType.INVALID_JOB) -> str | None:
    """The first non-empty string among ``paths`` (an empty string counts as absent)."""
    for path in paths:
        found = job.lookup(path)
        if found is None:
            continue
        value = found[1]
        if not isinstance(value, str):
            raise InvalidJob(f"{path} must be a string, got {type(value).__name__}")
        if len(value) > limit:
            raise InvalidJob(f"{path} is longer than {limit} characters", error_type=error_type)
        if value.strip():
            return value.strip()
    return None


def _size(job: Job) -> tuple[int, int, str | None]:
    found = params.size(job, ("config.resolution",))
    if found is not None:
        path, width, height = found
        _check_side(path, width, height)
    else:
        width = params.integer(job, ("config.width",), DEFAULT_SIZE, MIN_SIDE, MAX_SIDE)
        height = params.integer(job, ("config.height",), DEFAULT_SIZE, MIN_SIDE, MAX_SIDE)
    rounded = (width // 8 * 8, height // 8 * 8)
    requested = f"{width}x{height}" if rounded != (width, height) else None
    return rounded[0], rounded[1], requested


def _check_side(path: str, width: int, height: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidJob(f"{path} must have each side in [{MIN_SIDE}, {MAX_SIDE}] pixels, got {width}x{height}")


def _num_images(job: Job) -> int:
    found = job.lookup("config.num_images")
    if found is None:
        return 1
    value = found[1]
    number = finite_number(value)
    if number is None:
        raise InvalidJob(f"config.num_images must be a number (1, 3 or 6), got {describe(value)}")
    return round_images(number)


def _seed(job: Job) -> tuple[int, bool]:
    found = job.lookup("config.seed")
    if found is not None:
        value = found[1]
        seed = _exact_int(value)
        if seed == -1:  # the common "random" convention
            found = None
        elif seed is None or not 0 <= seed <= MAX_SEED:
            raise InvalidJob(f"config.seed must be an integer in [0, {MAX_SEED}] (or -1 for random), "
                             f"got {describe(value)}")
        else:
            return seed, False
    return secrets.randbits(32), True


def _strength(job: Job) -> tuple[float, str]:
    for path in STRENGTH_PATHS:
        value = params.real(job, (path,), None, 0.0, 1.0)
        if value is not None:
            return value, path
    reference = params.real(job, ("metadata.reference_strength",), None, 0.0, 1.0)
    if reference is not None:
        return 1.0 - reference, "1 - metadata.reference_strength"
    return DEFAULT_DENOISE_STRENGTH, "default"


def _exact_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value.strip()) <= 20:
        return int(value.strip())
    return None





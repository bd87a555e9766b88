"""A WAN job's parameters (CONTRACT §2.2), decoded once into a frozen ``WanRequest``.

First present field wins; a malformed value raises ``InvalidJob`` naming the field. Decisions the contract
leaves open:

- Size: ``config.resolution`` ("1024x576") maps to the native size of the same orientation (landscape
  832×480, portrait 480×832, square 624×624). ``config.size`` ("W*H") is taken as given when both sides are
  positive multiples of 16 up to 1280 (the model's patch grid; small sizes serve tests and previews);
  anything else is ``InvalidJob``. Without either: 832×480.
- Frames: ``config.frame_num`` rounds to the nearest 4n+1 and is capped at 81 (0 or negative is
  ``InvalidJob``); else ``metadata.duration`` seconds × 16 + 1, rounded the same way; else 81. Image types
  are always one frame.
- Seed: ``config.seed`` in [0, 2**63); 0 is a seed. Absent or -1 → a random 32-bit seed (reported).
- Solver: ``unipc`` (default) or ``dpm++`` (``dpmpp`` accepted); anything else runs UniPC and is reported as
  ``solver_fallback``.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum

from workers.core import params
from workers.core.errors import ErrorType, InvalidJob
from workers.core.job import Job, OutputKind, Queue

FPS = 16
MAX_FRAMES = 81
DEFAULT_SIZE = (832, 480)
NATIVE = {"landscape": (832, 480), "portrait": (480, 832), "square": (624, 624)}
SIZE_STEP = 16
MAX_SIDE = 1280
DEFAULT_SHIFT = 5.0
TIER_DEFAULTS = {"fast": (25, 6.5), "high": (50, 7.5)}
MAX_SEED = 2 ** 63 - 1


class Solver(str, Enum):
    UNIPC = "unipc"
    DPMPP = "dpm++"

    @classmethod
    def parse(cls, value: object) -> Solver | None:
        """The solver for a wire name, or ``None`` when it is not one we run."""
        if not isinstance(value, str):
            return None
        name = value.strip().lower()
        return {"unipc": cls.UNIPC, "dpm++": cls.DPMPP, "dpmpp": cls.DPMPP}.get(name)


@dataclass(frozen=True)
class References:
    """Reference-frame URLs (or local paths, from the CLI) by role; ``None`` when not given."""

    image: str | None = None
    first: str | None = None
    last: str | None = None


@dataclass(frozen=True)
class WanRequest:
    prompt: str
    negative_prompt: str
    is_video: bool
    width: int
    height: int
    size_source: str            # "default" | "config.resolution" | "config.size"
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    seed_was_random: bool
    solver: Solver
    solver_fallback: str | None  # the requested name when it was not a solver we run
    sample_shift: float
    enhance: bool
    enhance_instruction: str | None
    references: References
    frames_requested: int | None = None

    @property
    def output_kind(self) -> OutputKind:
        return OutputKind.VIDEO if self.is_video else OutputKind.IMAGE


def from_job(job: Job, max_prompt_chars: int = 2000) -> WanRequest:
    """Decode a ``wan_queue`` job or raise ``InvalidJob`` naming the bad field."""
    if job.queue is not Queue.WAN:
        raise InvalidJob(f"job type {job.type.value!r} is not a WAN job")
    tier_steps, tier_guidance = TIER_DEFAULTS[job.type.tier]
    is_video = job.type.output_kind is OutputKind.VIDEO
    width, height, size_source = _size(job)
    frames, requested = _frames(job) if is_video else (1, None)
    seed = params.integer(job, ["config.seed"], None, -1, MAX_SEED)
    solver_found = job.lookup("config.sample_solver")
    solver = Solver.parse(solver_found[1]) if solver_found else Solver.UNIPC
    shift = params.real(job, ["config.sample_shift"], DEFAULT_SHIFT, 0.0, 100.0)
    if shift <= 0:
        raise InvalidJob(f"config.sample_shift must be a number in (0, 100], got {shift!r}")
    return WanRequest(
        prompt=_prompt(job, max_prompt_chars),
        negative_prompt=_negative_prompt(job, max_prompt_chars),
        is_video=is_video,
        width=width,
        height=height,
        size_source=size_source,
        num_frames=frames,
        frames_requested=requested,
        steps=params.integer(job, ["config.num_inference_steps", "config.sample_steps"], tier_steps, 1, 200),
        guidance_scale=params.real(job, ["config.guidance_scale", "config.sample_guide_scale"],
                                   tier_guidance, 0.0, 30.0),
        seed=secrets.randbits(32) if seed is None or seed == -1 else seed,
        seed_was_random=seed is None or seed == -1,
        solver=solver or Solver.UNIPC,
        solver_fallback=None if solver else str(solver_found[1])[:40],
        sample_shift=shift,
        enhance=job.type.enhanced or params.flag(job, ["config.enhance_prompt"], False),
        enhance_instruction=params.text(job, ["metadata.enhance_instruction"], None, 4000) or None,
        references=References(
            image=_url(job, "config.image", "metadata.reference_image_url"),
            first=_url(job, "config.first_frame", "metadata.start_reference_url"),
            last=_url(job, "config.last_frame", "metadata.end_reference_url"),
        ),
    )


def round_frames(count: int) -> int:
    """Nearest 4n+1 (halves round up), at least 1 and at most 81."""
    n = (count - 1 + 2) // 4
    return max(1, min(MAX_FRAMES, 4 * n + 1))


def native_size(width: int, height: int) -> tuple[int, int]:
    """The model's native size with the same orientation as ``width``×``height``."""
    if width > height:
        return NATIVE["landscape"]
    if height > width:
        return NATIVE["portrait"]
    return NATIVE["square"]


def check_size(path: str, width: int, height: int) -> tuple[int, int]:
    for side in (width, height):
        if side % SIZE_STEP or not SIZE_STEP <= side <= MAX_SIDE:
            raise InvalidJob(f"{path} must be W*H with both sides multiples of {SIZE_STEP} between "
                             f"{SIZE_STEP} and {MAX_SIDE} (native: 832*480 or 480*832), got {width}*{height}")
    return width, height


def _size(job: Job) -> tuple[int, int, str]:
    found = params.size(job, ["config.resolution"])
    if found is not None:
        _, width, height = found
        return (*native_size(width, height), "config.resolution")
    found = params.size(job, ["config.size"])
    if found is not None:
        path, width, height = found
        return (*check_size(path, width, height), path)
    return (*DEFAULT_SIZE, "default")


def _frames(job: Job) -> tuple[int, int | None]:
    found = job.lookup("config.frame_num")
    if found is not None:
        count = params.integer(job, ["config.frame_num"], None, 1, 1_000_000)
        return round_frames(count), count
    duration = params.real(job, ["metadata.duration"], None, -1e9, 1e9)
    if duration is not None:
        if duration <= 0:
            raise InvalidJob(f"metadata.duration must be a positive number of seconds, got {duration:g}")
        count = int(round(min(duration, 3600.0) * FPS)) + 1
        return round_frames(count), count
    return MAX_FRAMES, None


def _prompt(job: Job, max_chars: int) -> str:
    prompt = job.prompt.strip()
    if job.compel_enabled and job.compel_weights.strip():
        prompt = f"{prompt}, {job.compel_weights.strip()}" if prompt else job.compel_weights.strip()
    if len(prompt) > max_chars:
        raise InvalidJob(f"prompt is longer than {max_chars} characters", error_type=ErrorType.INVALID_PROMPT)
    return prompt


def _negative_prompt(job: Job, max_chars: int) -> str:
    for path in ("negative_prompt", "config.negative_prompt", "metadata.negative_prompt"):
        value = params.text(job, [path], None, max_chars)
        if value and value.strip():
            return value.strip()
    return ""


def _url(job: Job, *paths: str) -> str | None:
    for path in paths:
        value = params.text(job, [path], None, 8192)
        if value and value.strip():
            return value.strip()
    return None

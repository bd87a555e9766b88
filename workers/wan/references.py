"""Reference frames (CONTRACT §2.2): the five modes, fetching under the failure policy, and the VACE
conditioning built from the fetched images.

``conditioning()`` is a pure function of the images and the output geometry, so what the model is asked to
honour can be checked without running it:

- ``single`` → ``reference_images=[image]`` (VACE subject/style reference);
- ``start`` / ``end`` / ``both`` → a ``video`` of ``num_frames`` frames holding the given frame(s) first/last
  and mid-gray elsewhere, and a ``mask`` of the same length: white (= generate) everywhere except black
  (= keep) at the given positions. With one frame, ``both`` keeps the first frame.
- A single image given together with first/last frames is passed as ``reference_images`` as well.

Fetching is all-or-nothing: under ``REFERENCE_FAILURE_POLICY=fallback`` one failed reference means standard
generation, reported; under ``fail`` the job fails with ``REFERENCE_FRAME_ERROR``. Without a VACE model
nothing is fetched and the job runs as text-to-video, reported with ``reference_mode_applied: false``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from PIL import Image, ImageOps

from workers.core.references import reference_or_fallback

from .request import References

GRAY = (128, 128, 128)
NO_VACE = "REFERENCE_FRAME_ERROR: no VACE model installed; generated without reference frames"
ROLE_FIELDS = {"image": "config.image", "first_frame": "config.first_frame", "last_frame": "config.last_frame"}


class ReferenceMode(str, Enum):
    NONE = "none"
    SINGLE = "single"
    START = "start"
    END = "end"
    BOTH = "both"

    @classmethod
    def of(cls, refs: References) -> ReferenceMode:
        if refs.first and refs.last:
            return cls.BOTH
        if refs.first:
            return cls.START
        if refs.last:
            return cls.END
        return cls.SINGLE if refs.image else cls.NONE


class Fetcher(Protocol):
    def fetch(self, url: str) -> Image.Image:
        """An RGB image, or raise ``ReferenceFailure``."""


@dataclass(frozen=True)
class ReferenceOutcome:
    mode: ReferenceMode
    images: dict[str, Image.Image] = field(default_factory=dict)   # role → image, only when applied
    applied: bool = False
    error: str | None = None
    failed_input: str | None = None

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"reference_mode": self.mode.value, "reference_mode_applied": self.applied}
        if self.error:
            meta["reference_error"] = self.error
        if self.failed_input:
            meta["reference_failed_input"] = self.failed_input
        if self.applied:
            meta["reference_inputs"] = sorted(self.images)
        return meta


def resolve(refs: References, fetcher: Fetcher, policy: str, vace_available: bool) -> ReferenceOutcome:
    """Fetch the job's references (all or nothing) under ``policy`` (``fallback`` | ``fail``)."""
    mode = ReferenceMode.of(refs)
    if mode is ReferenceMode.NONE:
        return ReferenceOutcome(mode)
    if not vace_available:
        return ReferenceOutcome(mode, error=NO_VACE)
    wanted = {"image": refs.image, "first_frame": refs.first, "last_frame": refs.last}
    images: dict[str, Image.Image] = {}
    for role, url in wanted.items():
        if not url:
            continue
        image, report = reference_or_fallback(fetcher, url, policy)
        if image is None:
            return ReferenceOutcome(mode, error=report, failed_input=ROLE_FIELDS[role])
        images[role] = image
    return ReferenceOutcome(mode, images=images, applied=True)


@dataclass(frozen=True)
class VaceConditioning:
    video: list[Image.Image] | None = None
    mask: list[Image.Image] | None = None
    reference_images: list[Image.Image] | None = None
    kept_frames: tuple[int, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``WanVACEPipeline.__call__``."""
        return {"video": self.video, "mask": self.mask, "reference_images": self.reference_images}


def conditioning(images: dict[str, Image.Image], width: int, height: int, num_frames: int) -> VaceConditioning:
    """The VACE inputs for the fetched ``images`` (roles ``image``, ``first_frame``, ``last_frame``)."""
    reference = [images["image"].convert("RGB")] if "image" in images else None
    placed: dict[int, Image.Image] = {}
    if "last_frame" in images:
        placed[num_frames - 1] = fit(images["last_frame"], width, height)
    if "first_frame" in images:
        placed[0] = fit(images["first_frame"], width, height)
    if not placed:
        return VaceConditioning(reference_images=reference)
    gray = Image.new("RGB", (width, height), GRAY)
    keep, generate = Image.new("L", (width, height), 0), Image.new("L", (width, height), 255)
    video = [placed.get(i, gray) for i in range(num_frames)]
    mask = [keep if i in placed else generate for i in range(num_frames)]
    return VaceConditioning(video=video, mask=mask, reference_images=reference, kept_frames=tuple(sorted(placed)))


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop ``image`` to exactly ``width``×``height`` (aspect kept, no bars)."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)

"""CONTRACT §2.1 field by field: precedence, defaults, adjustments and errors that name the field (no model)."""
from __future__ import annotations

import pytest
import torch

from workers.core.errors import ErrorType, InvalidJob, WorkerError
from workers.sdxl import weighting
from workers.sdxl.generation import oom_ladder
from workers.sdxl.request import SdxlRequest, img2img_schedule, round_images
from workers.sdxl.settings import SdxlSettings

from .conftest import make_job

SETTINGS = SdxlSettings(max_prompt_chars=200)


def req(prompt: str = "a cat", **fields) -> SdxlRequest:
    return SdxlRequest.from_job(make_job(prompt, small=False, **fields), SETTINGS)


def test_tier_defaults():
    fast, high = req(), req(type="sdxl_image_high")
    assert (fast.steps, fast.guidance_scale, fast.width, fast.height, fast.num_images) == (15, 6.0, 1024, 1024, 1)
    assert (high.steps, high.guidance_scale) == (25, 7.5)
    assert fast.reference_url is None and fast.negative_prompt is None and not fast.exact_copy


def test_steps_and_guidance_first_present_wins():
    assert req(metadata={"steps": 9}).steps == 9
    assert req(config={"steps": 8}, metadata={"steps": 9}).steps == 8
    assert req(config={"num_inference_steps": 7, "steps": 8}, metadata={"steps": 9}).steps == 7
    assert req(metadata={"guidance_scale": 3}).guidance_scale == 3.0
    assert req(config={"guidance_scale": "4.5"}, metadata={"guidance_scale": 3}).guidance_scale == 4.5


def test_sizes():
    r = req(config={"resolution": "1024x576"})
    assert (r.width, r.height, r.requested_size) == (1024, 576, None)
    r = req(config={"width": 768, "height": 512})
    assert (r.width, r.height) == (768, 512)
    assert (req(config={"height": 640}).width, req(config={"height": 640}).height) == (1024, 640)
    r = req(config={"resolution": "832*1216", "width": 64, "height": 64})  # resolution wins
    assert (r.width, r.height) == (832, 1216)
    r = req(config={"resolution": "1001x577"})  # rounded down to multiples of 8, reported
    assert (r.width, r.height, r.requested_size) == (1000, 576, "1001x577")


@pytest.mark.parametrize("value, expected", [(0, 1), (1, 1), (2, 3), (3, 3), (4, 6), (6, 6), (10, 6), ("3", 3),
                                             (2.5, 3), (-4, 1)])
def test_num_images_rounds_up_to_1_3_6(value, expected):
    assert req(config={"num_images": value}).num_images == expected
    assert round_images(expected) == expected


def test_seed():
    zero = req(config={"seed": 0})
    assert (zero.seed, zero.seed_generated) == (0, False)
    assert req(config={"seed": 2 ** 40 + 1}).seed == 2 ** 40 + 1  # exact, not through a float
    assert req(config={"seed": "77"}).seed == 77
    randoms = {req().seed for _ in range(5)} | {req(config={"seed": -1}).seed}
    assert len(randoms) > 1 and all(0 <= s < 2 ** 32 for s in randoms)
    assert req().seed_generated and req(config={"seed": -1}).seed_generated


def test_negative_prompt_precedence_skips_empty():
    assert req(metadata={"negative_prompt": "m"}).negative_prompt == "m"
    assert req(config={"negative_prompt": "c"}, metadata={"negative_prompt": "m"}).negative_prompt == "c"
    assert req(negative_prompt="t", config={"negative_prompt": "c"}).negative_prompt == "t"
    assert req(negative_prompt="", config={"negative_prompt": "c"}).negative_prompt == "c"


def test_reference_and_strength_precedence():
    assert req(reference_image_url="https://a/top.png").reference_url == "https://a/top.png"
    r = req(reference_image_url="https://a/top.png", metadata={"reference_image_url": "https://a/meta.png"})
    assert r.reference_url == "https://a/meta.png"
    assert (req().denoise_strength, req().denoise_source) == (0.5, "default")
    r = req(metadata={"reference_strength": 0.8})
    assert r.denoise_strength == pytest.approx(0.2) and r.denoise_source == "1 - metadata.reference_strength"
    assert req(metadata={"denoise_strength": 0.4, "reference_strength": 0.8}).denoise_strength == 0.4
    r = req(config={"denoise_strength": 0.3}, metadata={"denoise_strength": 0.4})
    assert (r.denoise_strength, r.denoise_source) == (0.3, "config.denoise_strength")
    assert req(metadata={"exact_copy_mode": True}).exact_copy


def test_compel_weights_appended_and_parsed():
    plain = req("a cat", compel_weights="(red:1.2)")
    assert (plain.prompt, plain.compel_applied) == ("a cat", False)  # not enabled: ignored
    r = req("a cat", compel_enabled=True, compel_weights="(red:1.2), (blurry:0.8)")
    assert r.prompt == "a cat, (red:1.2), (blurry:0.8)" and r.compel_applied
    assert [(s.text, s.weight) for s in r.segments if s.weight != 1.0] == [("red", 1.2), ("blurry", 0.8)]
    assert req("a (cat:1.0)", compel_enabled=True).compel_applied is False
    assert weighting.plain_text(weighting.parse("x (y:1.5) z", "prompt")) == "x (y:1.5) z"


@pytest.mark.parametrize("fields, named", [
    ({"config": {"num_images": "six"}}, "config.num_images"),
    ({"config": {"num_inference_steps": -3}}, "config.num_inference_steps"),
    ({"config": {"steps": 1000}}, "config.steps"),
    ({"config": {"resolution": "hugex1"}}, "config.resolution"),
    ({"config": {"resolution": "4096x4096"}}, "config.resolution"),
    ({"config": {"width": 0}}, "config.width"),
    ({"config": {"guidance_scale": "x"}}, "config.guidance_scale"),
    ({"config": {"seed": "abc"}}, "config.seed"),
    ({"config": {"seed": -5}}, "config.seed"),
    ({"metadata": {"reference_strength": 2}}, "metadata.reference_strength"),
    ({"config": {"denoise_strength": "lots"}}, "config.denoise_strength"),
    ({"metadata": {"exact_copy_mode": "maybe"}}, "metadata.exact_copy_mode"),
    ({"metadata": {"reference_image_url": 5}}, "metadata.reference_image_url"),
    ({"compel_enabled": True, "compel_weights": "(red:9)"}, "compel_weights"),
])
def test_bad_values_name_the_field(fields, named):
    with pytest.raises(InvalidJob) as caught:
        req(**fields)
    assert named in caught.value.message and caught.value.error_type is ErrorType.INVALID_JOB


def test_prompt_over_the_limit_is_invalid_prompt():
    with pytest.raises(InvalidJob) as caught:
        req("x" * 201)
    assert "prompt" in caught.value.message and caught.value.error_type is ErrorType.INVALID_PROMPT
    with pytest.raises(InvalidJob) as caught:
        req(negative_prompt="n" * 201)
    assert "negative_prompt" in caught.value.message
    assert req("x" * 200).prompt == "x" * 200


@pytest.mark.parametrize("steps, strength, exact, expected", [
    (25, 0.75, False, (25, 0.75, 18)),   # enough steps: unchanged
    (2, 0.3, False, (4, 0.3, 1)),        # 2 * 0.3 < 1: raised to 4 steps, 1 real one
    (15, 0.05, False, (20, 0.05, 1)),
    (15, 0.0, False, (100, 0.01, 1)),    # strength floor 0.01
    (15, 0.9, True, (20, 0.05, 1)),      # exact copy: minimal strength, one real step
    (30, 0.2, True, (30, 0.05, 1)),
    (3, 1.0, False, (3, 1.0, 3)),
])
def test_img2img_schedule_runs_at_least_one_real_step(steps, strength, exact, expected):
    s = img2img_schedule(steps, strength, exact)
    assert (s.steps, s.strength, s.denoising_steps) == expected
    assert int(s.steps * s.strength) >= 1


def _batches(fails_above: int, always: bool = False):
    calls: list[tuple[int, int]] = []

    def call(start: int, count: int) -> list[int]:
        calls.append((start, count))
        if always or count > fails_above:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return list(range(start, start + count))

    return calls, call


def test_oom_ladder_batch_fits():
    calls, call = _batches(fails_above=6)
    out = oom_ladder(6, call, lambda: None)
    assert (out.images, out.batch_size, out.oom_retries, calls) == (list(range(6)), 6, 0, [(0, 6)])


def test_oom_ladder_retries_once_then_smaller_batches():
    calls, call = _batches(fails_above=3)
    freed = []
    out = oom_ladder(6, call, lambda: freed.append(1))
    assert calls == [(0, 6), (0, 6), (0, 3), (3, 3)]
    assert (out.images, out.batch_size, out.oom_retries, len(freed)) == (list(range(6)), 3, 2, 2)
    calls, call = _batches(fails_above=1)
    out = oom_ladder(6, call, lambda: None)
    assert calls == [(0, 6), (0, 6), (0, 3), (0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert (out.images, out.batch_size) == (list(range(6)), 1)


def test_oom_ladder_gives_up_with_oom_error():
    calls, call = _batches(fails_above=0, always=True)
    with pytest.raises(WorkerError) as caught:
        oom_ladder(3, call, lambda: None)
    assert caught.value.error_type is ErrorType.OOM_ERROR and caught.value.retryable
    assert calls == [(0, 3), (0, 3), (0, 1)]

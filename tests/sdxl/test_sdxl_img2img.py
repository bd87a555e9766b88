"""Image-to-image from a reference fetched over loopback HTTP: strength, the one-step floor, exact copy,
letterboxing, and every reference failure reported (fallback) or raised (policy ``fail``)."""
from __future__ import annotations

import numpy as np
import pytest

from workers.core.errors import ErrorType
from workers.core.references import ReferenceFailure

from .conftest import handler_with, make_job, pixels, settings_for


def run(handler, **fields):
    return handler.run(make_job(**fields), lambda fraction, message: None)


def image_of(result, i=0):
    return pixels(result.outputs[i].data)


def with_reference(url: str, config: dict | None = None, **metadata):
    return {"metadata": {"reference_image_url": url, **metadata}, "config": {"seed": 21, **(config or {})}}


def test_reference_switches_to_img2img_and_strength_changes_output(sdxl_handler, references):
    url = references.at("/ref.png?w=64&h=64&seed=1")
    text = run(sdxl_handler, config={"seed": 21, "denoise_strength": 0.5})   # no reference: strength ignored
    assert text.metadata["pipeline"] == "txt2img" and "denoise_strength" not in text.outputs[0].metadata
    low = run(sdxl_handler, **with_reference(url, {"denoise_strength": 0.5, "num_inference_steps": 4}))
    high = run(sdxl_handler, **with_reference(url, {"denoise_strength": 1.0, "num_inference_steps": 4}))
    meta = low.metadata
    assert (meta["pipeline"], meta["reference_mode"], meta["reference_mode_applied"]) == ("img2img", "img2img", True)
    assert (meta["denoise_strength"], meta["denoise_strength_source"]) == (0.5, "config.denoise_strength")
    assert (meta["steps"], meta["denoising_steps"], meta["reference_letterboxed"]) == (4, 2, False)
    assert low.outputs[0].metadata["denoise_strength"] == 0.5 and high.outputs[0].metadata["denoise_strength"] == 1.0
    assert "reference_error" not in meta
    assert not np.array_equal(image_of(low), image_of(high))
    assert not np.array_equal(image_of(low), image_of(text))
    other = run(sdxl_handler, **with_reference(references.at("/ref.png?w=64&h=64&seed=2"),
                                               {"denoise_strength": 0.5, "num_inference_steps": 4}))
    assert not np.array_equal(image_of(low), image_of(other))  # the reference's pixels matter


def test_reference_strength_and_one_step_floor(sdxl_handler, references):
    url = references.at("/ref.png?w=64&h=64&seed=1")
    result = run(sdxl_handler, **with_reference(url, {"num_inference_steps": 2}, reference_strength=0.7))
    meta = result.metadata
    assert meta["denoise_strength"] == pytest.approx(0.3)
    assert meta["denoise_strength_source"] == "1 - metadata.reference_strength"
    # 2 steps x 0.3 < 1 real step: raised to 4 scheduler steps, one of which runs; both reported
    assert (meta["steps"], meta["num_inference_steps"], meta["denoising_steps"], meta["requested_steps"]) == (
        4,
        4,
        1,
        2,
    )
    assert result.outputs[0].metadata["steps"] == 4


def test_num_images_with_reference_uses_seed_plus_i(sdxl_handler, references):
    url = references.at("/ref.png?w=64&h=64&seed=1")
    result = run(sdxl_handler, **with_reference(url, {"num_images": 3, "denoise_strength": 0.6}))
    assert len(result.outputs) == 3 and result.metadata["batch_size"] == 3
    assert [o.metadata["seed"] for o in result.outputs] == [21, 22, 23]
    assert not np.array_equal(image_of(result, 0), image_of(result, 1))


def test_exact_copy_is_minimal_strength_with_one_real_step(sdxl_handler, references):
    url = references.at("/ref.png?w=64&h=64&seed=1")
    result = run(sdxl_handler, prompt="", **with_reference(url, {"denoise_strength": 0.9}, exact_copy_mode=True))
    meta = result.metadata
    assert meta["exact_copy_mode"] is True and meta["reference_mode_applied"] is True
    assert (meta["denoise_strength"], meta["denoising_steps"]) == (0.05, 1)
    assert meta["steps"] * meta["denoise_strength"] >= 1
    other = run(sdxl_handler, prompt="", **with_reference(references.at("/ref.png?w=64&h=64&seed=2"),
                                                          exact_copy_mode=True))
    assert not np.array_equal(image_of(result), image_of(other))  # the output follows the reference


def test_reference_is_letterboxed_to_the_requested_size(sdxl_handler, references):
    url = references.at("/ref.png?w=128&h=48&seed=3")
    result = run(sdxl_handler, **with_reference(url, {"resolution": "64x96", "denoise_strength": 0.5}))
    assert result.metadata["reference_letterboxed"] is True
    assert pixels(result.outputs[0].data).shape == (96, 64, 3)


@pytest.mark.parametrize("path, reason", [("/missing.png", "HTTP 404"), ("/text.png", "not a decodable image")])
def test_failed_reference_falls_back_and_says_so(sdxl_handler, references, path, reason):
    result = run(sdxl_handler, **with_reference(references.at(path), exact_copy_mode=True))
    meta = result.metadata
    assert (meta["pipeline"], meta["reference_mode"], meta["reference_mode_applied"]) == ("txt2img", "img2img", False)
    assert meta["reference_error"].startswith("REFERENCE_FRAME_ERROR: ") and reason in meta["reference_error"]
    assert meta["exact_copy_mode"] is False and "exact_copy_note" in meta
    assert len(result.outputs) == 1 and "denoise_strength" not in result.outputs[0].metadata


def test_blocked_addresses_are_never_fetched(sdxl_handler, shared_pipes, demo_models, references):
    port = references.port
    # 127.0.0.2 is loopback and not in REFERENCE_ALLOW_HOSTS (only 127.0.0.1 is)
    result = run(sdxl_handler, **with_reference(f"http://127.0.0.2:{port}/ref.png"))
    assert result.metadata["reference_mode_applied"] is False
    assert "blocked" in result.metadata["reference_error"]
    strict = handler_with(shared_pipes, settings_for(demo_models["sdxl_single_file"], demo_models["sdxl"],
                                                     reference_allow_hosts=frozenset()))
    for url in (f"http://localhost:{port}/ref.png", f"http://127.0.0.1:{port}/ref.png", "file:///etc/passwd"):
        meta = run(strict, **with_reference(url)).metadata
        assert meta["reference_mode_applied"] is False and meta["reference_error"].startswith("REFERENCE_FRAME_ERROR")


def test_policy_fail_raises_reference_frame_error(shared_pipes, demo_models, references):
    failing = handler_with(shared_pipes, settings_for(demo_models["sdxl_single_file"], demo_models["sdxl"],
                                                      reference_failure_policy="fail"))
    with pytest.raises(ReferenceFailure) as caught:
        run(failing, **with_reference(references.at("/missing.png")))
    assert caught.value.error_type is ErrorType.REFERENCE_FRAME_ERROR and not caught.value.retryable
    assert failing.jobs_done == 0
    good = run(failing, **with_reference(references.at("/ref.png?w=64&h=64&seed=1")))
    assert good.metadata["reference_mode_applied"] is True

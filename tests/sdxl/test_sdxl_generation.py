"""The SDXL handler end to end on the tiny demo SDXL: every §2.1 field changes the pixels or the reported
metadata as the contract says (64x64, 2 steps, except the one full-size resolution test)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from workers.core.errors import ErrorType, InvalidJob
from workers.core.handler import Result
from workers.sdxl import weighting

from .conftest import make_job, pixels

APP_OWNED = {"destination", "scene_id", "character_id", "conversation_id", "prompt", "user_id"}


def run(handler, *args, **fields) -> Result:
    return handler.run(make_job(*args, **fields), lambda fraction, message: None)


def image_of(result: Result, i: int = 0) -> np.ndarray:
    return pixels(result.outputs[i].data)


def test_same_seed_same_pixels_and_seed_zero_is_valid(sdxl_handler):
    first = run(sdxl_handler, config={"seed": 0})
    again = run(sdxl_handler, config={"seed": 0})
    other = run(sdxl_handler, config={"seed": 1})
    assert np.array_equal(image_of(first), image_of(again))
    assert not np.array_equal(image_of(first), image_of(other))
    assert first.metadata["seed"] == 0 and first.metadata["seed_generated"] is False
    assert first.outputs[0].metadata["seed"] == 0


def test_random_seed_is_reported_and_reproducible(sdxl_handler):
    result = run(sdxl_handler)
    seed = result.metadata["seed"]
    assert result.metadata["seed_generated"] is True and 0 <= seed < 2 ** 32
    assert np.array_equal(image_of(result), image_of(run(sdxl_handler, config={"seed": seed})))


def test_two_images_round_up_to_three_in_one_batch_with_seed_plus_i(sdxl_handler):
    result = run(sdxl_handler, config={"seed": 40, "num_images": 2})
    assert [o.name for o in result.outputs] == ["0.png", "1.png", "2.png"]
    assert result.metadata["num_images"] == 3 and result.metadata["batch_size"] == 3
    assert [o.metadata["seed"] for o in result.outputs] == [40, 41, 42]
    assert [o.metadata["asset_index"] for o in result.outputs] == [0, 1, 2]
    for output in result.outputs:
        assert (output.content_type, output.kind) == ("image/png", "image")
        assert output.data.startswith(b"\x89PNG")
        assert {"seed", "width", "height", "steps", "guidance_scale", "format"} <= set(output.metadata)
        assert "denoise_strength" not in output.metadata  # text-to-image
    images = [image_of(result, i) for i in range(3)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    alone = run(sdxl_handler, config={"seed": 41})  # image 1 of the batch == seed 41 on its own
    assert np.abs(images[1] - image_of(alone)).max() <= 2


def test_job_metadata_has_effective_values_and_no_app_keys(sdxl_handler):
    result = run(sdxl_handler, type="sdxl_image_high", config={"seed": 3, "guidance_scale": 5.5})
    meta = result.metadata
    assert meta["job_type"] == "sdxl_image_high"
    assert (meta["steps"], meta["num_inference_steps"], meta["guidance_scale"]) == (2, 2, 5.5)
    assert (meta["width"], meta["height"], meta["num_images"]) == (64, 64, 1)
    assert (meta["reference_mode"], meta["reference_mode_applied"], meta["exact_copy_mode"]) == ("none", False, False)
    assert meta["negative_prompt_used"] is False and meta["compel_applied"] is False
    assert meta["generation_time"] > 0 and "reference_error" not in meta
    assert not APP_OWNED & set(meta)


def test_guidance_and_steps_change_the_image(sdxl_handler):
    base = image_of(run(sdxl_handler, config={"seed": 5}))
    assert not np.array_equal(base, image_of(run(sdxl_handler, config={"seed": 5, "guidance_scale": 1.5})))
    three = run(sdxl_handler, config={"seed": 5, "num_inference_steps": 3})
    assert three.metadata["steps"] == 3 and not np.array_equal(base, image_of(three))


def test_negative_prompt_reaches_the_pipeline(sdxl_handler):
    without = run(sdxl_handler, config={"seed": 9})
    for fields in ({"negative_prompt": "blurry, low quality"}, {"config": {"negative_prompt": "blurry, low quality"}},
                   {"metadata": {"negative_prompt": "blurry, low quality"}}):
        config = {"seed": 9, **fields.pop("config", {})}
        result = run(sdxl_handler, config=config, **fields)
        assert result.metadata["negative_prompt_used"] is True
        assert not np.array_equal(image_of(without), image_of(result))
    top = run(sdxl_handler, negative_prompt="blurry, low quality", config={"seed": 9, "negative_prompt": "text"})
    meta_only = run(sdxl_handler, metadata={"negative_prompt": "blurry, low quality"}, config={"seed": 9})
    assert np.array_equal(image_of(top), image_of(meta_only))  # top level wins over config


def test_legacy_width_height_and_rounding(sdxl_handler):
    result = run(sdxl_handler, small=False, config={"width": 80, "height": 64, "num_inference_steps": 1})
    with Image.open(io.BytesIO(result.outputs[0].data)) as image:
        assert image.size == (80, 64)
    rounded = run(sdxl_handler, small=False, config={"resolution": "101x70", "num_inference_steps": 1})
    assert (rounded.metadata["width"], rounded.metadata["height"]) == (96, 64)
    assert rounded.metadata["requested_resolution"] == "101x70"
    assert (rounded.outputs[0].metadata["width"], rounded.outputs[0].metadata["height"]) == (96, 64)


def test_resolution_1024x576_full_size_png_and_thumbnail(sdxl_handler):
    started = time.monotonic()
    result = run(sdxl_handler, small=False, config={"resolution": "1024x576", "num_inference_steps": 1, "seed": 1})
    elapsed = time.monotonic() - started
    output = result.outputs[0]
    with Image.open(io.BytesIO(output.data)) as image:
        assert (image.format, image.size) == ("PNG", (1024, 576))
    with Image.open(io.BytesIO(output.thumbnail)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (256, 144)
    assert (output.metadata["width"], output.metadata["height"]) == (1024, 576)
    print(f"1024x576, 1 step, tiny SDXL on CPU: {elapsed:.1f} s")


def test_thumbnails_are_webp_at_most_256(sdxl_handler):
    result = run(sdxl_handler, config={"seed": 2})
    with Image.open(io.BytesIO(result.outputs[0].thumbnail)) as thumb:
        assert thumb.format == "WEBP" and max(thumb.size) <= 256


def test_compel_weights_change_the_embeddings_not_the_text(sdxl_handler, shared_pipes):
    prompt, config = "a cat on a chair", {"seed": 11}
    plain = run(sdxl_handler, f"{prompt}, red", config=config)
    neutral = run(sdxl_handler, prompt, compel_enabled=True, compel_weights="(red:1.0)", config=config)
    strong = run(sdxl_handler, prompt, compel_enabled=True, compel_weights="(red:2.0)", config=config)
    literal = run(sdxl_handler, prompt, compel_enabled=False, compel_weights="(red:2.0)", config=config)
    assert neutral.metadata["compel_applied"] is False and strong.metadata["compel_applied"] is True
    assert np.array_equal(image_of(plain), image_of(neutral))      # weight 1.0 == the plain appended text
    assert not np.array_equal(image_of(plain), image_of(strong))   # a real weight changes the result
    assert np.array_equal(image_of(literal), image_of(run(sdxl_handler, prompt, config=config)))  # disabled
    # the weighted encoder reproduces the pipeline's own encoding at weight 1 (both encoders, pooled too)
    pipe = shared_pipes.t2i
    embeds, _, pooled, _ = pipe.encode_prompt("a cat, red dog", do_classifier_free_guidance=False)
    mine, mine_pooled = weighting.encode(pipe, weighting.parse("a cat, (red:1) dog", "prompt"))
    assert torch.equal(embeds, mine) and torch.equal(pooled, mine_pooled)
    heavy, _ = weighting.encode(pipe, weighting.parse("a cat, (red:1.5) dog", "prompt"))
    assert not torch.equal(embeds, heavy)


def test_progress_is_reported(sdxl_handler):
    seen: list[float] = []
    sdxl_handler.run(make_job(config={"seed": 1, "num_images": 3}), lambda f, m: seen.append(f))
    assert seen and seen == sorted(seen) and 0 < seen[-1] < 1


def test_bad_values_fail_before_any_work(sdxl_handler):
    done = sdxl_handler.jobs_done
    for fields, named in (({"config": {"num_images": "six"}}, "config.num_images"),
                          ({"config": {"num_inference_steps": -3}}, "config.num_inference_steps"),
                          ({"config": {"resolution": "hugex1"}}, "config.resolution"),
                          ({"config": {"guidance_scale": "x"}}, "config.guidance_scale")):
        with pytest.raises(InvalidJob) as caught:
            run(sdxl_handler, **fields)
        assert named in caught.value.message
    with pytest.raises(InvalidJob) as caught:
        run(sdxl_handler, "y" * (sdxl_handler.settings.max_prompt_chars + 1))
    assert caught.value.error_type is ErrorType.INVALID_PROMPT and "prompt" in caught.value.message
    assert sdxl_handler.jobs_done == done


def test_to_pil_rounds_exactly_as_diffusers_numpy_to_pil():
    import numpy as np
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from workers.sdxl.images import to_pil

    images = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, :3] = torch.tensor([0.0, 1.0, 0.5])        # the ends and a midpoint
    images[1, 0, 0, :] = torch.arange(23) / 22                   # an even ramp
    ours = [np.asarray(image) for image in to_pil(images)]
    theirs = [np.asarray(image) for image in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))]
    assert all(a.dtype == np.uint8 and a.shape == (17, 23, 3) and np.array_equal(a, b) for a, b in zip(ours, theirs))

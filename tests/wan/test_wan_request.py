"""CONTRACT §2.2 parameter decoding: tier defaults, first-present-wins, size/frames/seed/solver rules, and
InvalidJob naming the field for bad values. Pure: no model."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.core.errors import ErrorType, InvalidJob
from workers.core.job import decode
from workers.wan.references import ReferenceMode
from workers.wan.request import Solver, from_job, round_frames

from .conftest import make_job

TYPES = {
    "video_fast": (True, 25, 6.5, False), "video_high": (True, 50, 7.5, False),
    "image_fast": (False, 25, 6.5, False), "image_high": (False, 50, 7.5, False),
    "image7b_fast_enhanced": (False, 25, 6.5, True), "image7b_high_enhanced": (False, 50, 7.5, True),
    "video7b_fast_enhanced": (True, 25, 6.5, True), "video7b_high_enhanced": (True, 50, 7.5, True),
}


def req(small: bool = False, **fields):
    return from_job(make_job(small=small, **fields))


@pytest.mark.parametrize("job_type", sorted(TYPES))
def test_tier_defaults_per_type(job_type):
    is_video, steps, guidance, enhanced = TYPES[job_type]
    r = req(type=job_type)
    assert (r.is_video, r.steps, r.guidance_scale, r.enhance) == (is_video, steps, guidance, enhanced)
    assert (r.width, r.height, r.size_source) == (832, 480, "default")
    assert r.num_frames == (81 if is_video else 1)
    assert r.solver is Solver.UNIPC and r.sample_shift == 5.0 and r.solver_fallback is None


@pytest.mark.parametrize("alias,expected", [("wan_video_fast", (25, 6.5)), ("wan_video_high", (50, 7.5))])
def test_wan_video_aliases(alias, expected):
    job = decode(json.dumps({"id": "a-1", "job_type": alias, "user_id": "u", "prompt": "p"}))
    r = from_job(job)
    assert r.is_video and (r.steps, r.guidance_scale) == expected
    routed = decode(json.dumps({"id": "a-2", "type": "video_high", "job_type": "wan_video_high", "user_id": "u"}))
    assert from_job(routed).steps == 50


def test_first_present_wins_for_steps_and_guidance():
    r = req(config={"num_inference_steps": 7, "sample_steps": 9, "guidance_scale": 3, "sample_guide_scale": 4})
    assert (r.steps, r.guidance_scale) == (7, 3.0)
    r = req(config={"sample_steps": 9, "sample_guide_scale": 4.5})
    assert (r.steps, r.guidance_scale) == (9, 4.5)


@pytest.mark.parametrize("resolution,expected", [("1024x576", (832, 480)), ("576x1024", (480, 832)),
                                                 ("512x512", (624, 624)), ("832*480", (832, 480))])
def test_resolution_maps_to_native_size_of_its_orientation(resolution, expected):
    r = req(config={"resolution": resolution, "size": "64*64"})
    assert (r.width, r.height) == expected and r.size_source == "config.resolution"


def test_size_is_width_by_height_multiples_of_16():
    assert (req(config={"size": "480*832"}).width, req(config={"size": "480*832"}).height) == (480, 832)
    r = req(config={"size": "64*96"})
    assert (r.width, r.height, r.size_source) == (64, 96, "config.size")


@pytest.mark.parametrize("config,field", [
    ({"resolution": "0x0"}, "config.resolution"), ({"resolution": "big"}, "config.resolution"),
    ({"size": "65*64"}, "config.size"), ({"size": "2048*64"}, "config.size"), ({"size": 640}, "config.size"),
    ({"frame_num": 0}, "config.frame_num"), ({"frame_num": -3}, "config.frame_num"),
    ({"frame_num": "many"}, "config.frame_num"), ({"frame_num": 4.5}, "config.frame_num"),
    ({"num_inference_steps": "ten"}, "config.num_inference_steps"), ({"sample_steps": 0}, "config.sample_steps"),
    ({"guidance_scale": "high"}, "config.guidance_scale"), ({"seed": "lucky"}, "config.seed"),
    ({"seed": -5}, "config.seed"), ({"sample_shift": 0}, "config.sample_shift"),
    ({"sample_shift": "x"}, "config.sample_shift"), ({"enhance_prompt": "maybe"}, "config.enhance_prompt"),
    ({"image": 5}, "config.image"), ({"negative_prompt": ["x"]}, "config.negative_prompt"),
])
def test_bad_values_are_invalid_job_naming_the_field(config, field):
    with pytest.raises(InvalidJob) as caught:
        req(config=config)
    assert field in caught.value.message and caught.value.error_type is ErrorType.INVALID_JOB


def test_bad_duration_and_too_long_prompt():
    with pytest.raises(InvalidJob, match="metadata.duration"):
        req(metadata={"duration": 0})
    with pytest.raises(InvalidJob, match="metadata.duration"):
        req(metadata={"duration": "long"})
    with pytest.raises(InvalidJob) as caught:
        from_job(make_job(prompt="x" * 2001))
    assert caught.value.error_type is ErrorType.INVALID_PROMPT


@pytest.mark.parametrize("frame_num,expected", [(1, 1), (2, 1), (3, 5), (5, 5), (10, 9), (11, 13), (33, 33),
                                                (81, 81), (82, 81), (500, 81)])
def test_frame_num_rounds_to_4n_plus_1_at_most_81(frame_num, expected):
    r = req(config={"frame_num": frame_num})
    assert r.num_frames == expected and r.frames_requested == frame_num


def test_duration_seconds_times_16_plus_1():
    assert req(metadata={"duration": 2}).num_frames == 33
    assert req(metadata={"duration": 5}).num_frames == 81
    assert req(metadata={"duration": 0.5}).num_frames == 9
    assert req(config={"frame_num": 17}, metadata={"duration": 2}).num_frames == 17   # frame_num wins


def test_image_types_are_one_frame_whatever_is_asked():
    assert req(type="image_high", config={"frame_num": 33}, metadata={"duration": 3}).num_frames == 1


@given(st.integers(min_value=1, max_value=10_000))
def test_round_frames_is_4n_plus_1_within_bounds(count):
    frames = round_frames(count)
    assert frames % 4 == 1 and 1 <= frames <= 81
    if count <= 81:
        assert abs(frames - count) <= 2


def test_seed_zero_is_a_seed_and_absent_or_minus_one_is_random():
    r = req(config={"seed": 0})
    assert r.seed == 0 and not r.seed_was_random
    randoms = [req(), req(config={"seed": -1})]
    assert all(x.seed_was_random and 0 <= x.seed < 2 ** 32 for x in randoms)
    assert req(config={"seed": 2 ** 40}).seed == 2 ** 40


@pytest.mark.parametrize("name,solver,fallback", [("unipc", Solver.UNIPC, None), ("dpm++", Solver.DPMPP, None),
                                                  ("DPM++", Solver.DPMPP, None), ("euler", Solver.UNIPC, "euler"),
                                                  (3, Solver.UNIPC, "3")])
def test_solver_choice_and_reported_fallback(name, solver, fallback):
    r = req(config={"sample_solver": name, "sample_shift": 3})
    assert (r.solver, r.solver_fallback, r.sample_shift) == (solver, fallback, 3.0)


def test_negative_prompt_top_level_then_config_then_metadata():
    assert req(negative_prompt="top", config={"negative_prompt": "cfg"}).negative_prompt == "top"
    assert req(negative_prompt="", config={"negative_prompt": "cfg"},
               metadata={"negative_prompt": "meta"}).negative_prompt == "cfg"
    assert req(metadata={"negative_prompt": "meta"}).negative_prompt == "meta"
    assert req().negative_prompt == ""


def test_enhancement_switches_and_instruction():
    assert not req().enhance
    assert req(config={"enhance_prompt": True}).enhance
    r = req(type="image7b_fast_enhanced", metadata={"enhance_instruction": "Say it in French."})
    assert r.enhance and r.enhance_instruction == "Say it in French."


def test_compel_weights_are_appended_when_enabled():
    assert req(compel_enabled=True, compel_weights="(red:1.2)").prompt.endswith(", (red:1.2)")
    assert "(red" not in req(compel_enabled=False, compel_weights="(red:1.2)").prompt


@pytest.mark.parametrize("config,metadata,mode", [
    ({}, {}, ReferenceMode.NONE),
    ({"image": "http://h/a.png"}, {}, ReferenceMode.SINGLE),
    ({}, {"reference_image_url": "http://h/a.png"}, ReferenceMode.SINGLE),
    ({"first_frame": "http://h/a.png"}, {}, ReferenceMode.START),
    ({}, {"start_reference_url": "http://h/a.png"}, ReferenceMode.START),
    ({"last_frame": "http://h/b.png"}, {}, ReferenceMode.END),
    ({}, {"end_reference_url": "http://h/b.png"}, ReferenceMode.END),
    ({"first_frame": "http://h/a.png"}, {"end_reference_url": "http://h/b.png"}, ReferenceMode.BOTH),
])
def test_reference_fields_and_modes(config, metadata, mode):
    assert ReferenceMode.of(req(config=config, metadata=metadata).references) is mode


def test_config_reference_wins_over_metadata():
    r = req(config={"first_frame": "http://h/config.png"}, metadata={"start_reference_url": "http://h/meta.png"})
    assert r.references.first == "http://h/config.png"


def test_non_wan_jobs_are_refused():
    with pytest.raises(InvalidJob, match="not a WAN job"):
        from_job(make_job(type="sdxl_image_fast"))

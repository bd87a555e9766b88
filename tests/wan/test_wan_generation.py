"""The WAN handler end to end on the tiny demo WAN (+ VACE): outputs per job type, sizes, frame counts,
seeds, solvers, reference modes through real VACE runs, and the reported metadata (64x64, 2 steps, 5 frames,
except the one full-size resolution test)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from workers.core.errors import ErrorType, InvalidJob
from workers.core.references import ReferenceFailure
from workers.wan.handler import WanHandler
from workers.wan.pipeline import load_t2v, load_vace

from .conftest import handler_with, make_job, no_progress, png_size, video_frames

APP_OWNED = {"destination", "scene_id", "character_id", "conversation_id", "prompt", "user_id"}


@pytest.mark.parametrize("job_type", ["video_fast", "video_high", "video7b_fast_enhanced",
                                      "video7b_high_enhanced", "image_fast", "image_high",
                                      "image7b_fast_enhanced", "image7b_high_enhanced"])
def test_each_job_type_makes_the_right_file(job_type, handler, models, chat):
    result = handler.run(make_job(job_type, config={"size": "64*48"}), no_progress)
    [output] = result.outputs
    meta = result.metadata
    assert meta["job_type"] == job_type and meta["steps"] == meta["num_inference_steps"] == 2
    assert meta["width"] == 64 and meta["height"] == 48 and not APP_OWNED & set(meta)
    assert output.thumbnail[:4] == b"RIFF" and output.thumbnail[8:12] == b"WEBP"
    assert models.last["num_inference_steps"] == 2
    if job_type.startswith("video"):
        assert (output.name, output.content_type, output.kind) == ("0.mp4", "video/mp4", "video")
        frames = video_frames(output.data)
        assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
        assert meta["frame_num"] == output.metadata["frame_num"] == 5
        assert output.metadata["duration_seconds"] == meta["duration_seconds"] == 5 / 16
        assert output.metadata["fps"] == 16 and output.metadata["format"] == "mp4"
    else:
        assert (output.name, output.content_type, output.kind) == ("0.png", "image/png", "image")
        assert png_size(output.data) == (64, 48) and "frame_num" not in meta
        assert models.last["num_frames"] == 1
    if "enhanced" in job_type:
        assert meta["enhancement_applied"] and meta["enhancement_source"] == "qwen_base"
        assert meta["enhanced_prompt"] == "vivid cinematic shot: a cat sitting on a red chair"
    else:
        assert "enhanced_prompt" not in meta and "enhancement_applied" not in meta


def test_tier_guidance_reaches_the_pipeline(handler, models):
    handler.run(make_job("image_high", config={"num_inference_steps": 1}), no_progress)
    assert (models.last["guidance_scale"], models.last["num_inference_steps"]) == (7.5, 1)


def test_same_seed_same_pixels_other_seed_other_pixels(handler):
    def run(seed):
        result = handler.run(make_job("image_fast", config={"seed": seed, "size": "32*32"}), no_progress)
        assert result.metadata["seed"] == seed and result.outputs[0].metadata["seed"] == seed
        return result.outputs[0].data
    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_random_seed_is_reported_and_reproduces(handler):
    job = make_job("image_fast", config={"size": "32*32", "seed": None})
    result = handler.run(job, no_progress)
    seed = result.metadata["seed"]
    assert result.metadata["seed_was_random"] and 0 <= seed < 2 ** 32
    again = handler.run(make_job("image_fast", config={"size": "32*32", "seed": seed}), no_progress)
    assert again.outputs[0].data == result.outputs[0].data


def test_duration_two_seconds_is_33_frames(handler):
    result = handler.run(make_job(config={"frame_num": None, "size": "32*32"}, metadata={"duration": 2}),
                         no_progress)
    assert len(video_frames(result.outputs[0].data)) == 33
    assert result.metadata["frame_num"] == 33 and result.metadata["duration_seconds"] == 33 / 16


def test_frame_num_is_rounded_and_reported(handler, models):
    result = handler.run(make_job(config={"frame_num": 7, "size": "32*32"}), no_progress)
    assert models.last["num_frames"] == 9 and len(video_frames(result.outputs[0].data)) == 9
    assert result.metadata["frame_num_requested"] == 7


def test_resolution_1024x576_renders_at_native_832x480(handler):
    """The one full-size test: one frame, one step (about 1-2 s here)."""
    started = time.monotonic()
    result = handler.run(make_job("image_fast", small=False, config={"resolution": "1024x576",
                                                                      "num_inference_steps": 1, "seed": 5}),
                         no_progress)
    assert png_size(result.outputs[0].data) == (832, 480)
    assert result.metadata["size_source"] == "config.resolution"
    assert time.monotonic() - started < 60


def test_solvers_shift_and_fallback(handler, models):
    result = handler.run(make_job("image_fast", config={"sample_solver": "dpm++", "sample_shift": 3.0}),
                         no_progress)
    scheduler = models.last["scheduler"]
    assert isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.flow_shift == 3.0
    assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
    assert result.metadata["solver"] == "dpm++" and result.metadata["sample_shift"] == 3.0
    result = handler.run(make_job("image_fast", config={"sample_solver": "euler"}), no_progress)
    scheduler = models.last["scheduler"]
    assert isinstance(scheduler, UniPCMultistepScheduler) and scheduler.config.flow_shift == 5.0
    assert result.metadata["solver"] == "unipc" and result.metadata["solver_fallback"] == "euler"
    # The shared pipelines keep their own scheduler untouched.
    assert models._t2v.scheduler.config.flow_shift == 5.0 and models._t2v.scheduler is not scheduler


def test_negative_prompt_is_honoured(handler, models):
    result = handler.run(make_job("image_fast", negative_prompt="blurry, watermark"), no_progress)
    assert models.last["negative_prompt"] == "blurry, watermark" and result.metadata["negative_prompt_used"]


def test_progress_is_reported_per_step(handler):
    seen = []
    handler.run(make_job("image_fast", config={"num_inference_steps": 3}), lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [m for _, m in seen if m.startswith("step")] == ["step 1/3", "step 2/3", "step 3/3"]


@pytest.mark.parametrize("config,field", [({"frame_num": 0}, "config.frame_num"),
                                          ({"resolution": "0x0"}, "config.resolution"),
                                          ({"num_inference_steps": "ten"}, "config.num_inference_steps")])
def test_bad_values_fail_the_job_naming_the_field(handler, models, config, field):
    calls = len(models.calls)
    with pytest.raises(InvalidJob) as caught:
        handler.run(make_job(config=config), no_progress)
    assert field in caught.value.message and len(models.calls) == calls


# ----------------------------------------------------------------------------------------- references
def test_each_reference_mode_conditions_vace(handler, models, media):
    red, blue = media.at("/frame.png?c=230,20,20"), media.at("/frame.png?c=20,20,230")
    cases = {"single": {"image": red}, "start": {"first_frame": red}, "end": {"last_frame": blue},
             "both": {"first_frame": red, "last_frame": blue}}
    plain = handler.run(make_job(config={"seed": 3}), no_progress).outputs[0].data
    assert models.last["pipeline"] == "WanPipeline"
    for mode, config in cases.items():
        result = handler.run(make_job(config={"seed": 3, **config}), no_progress)
        call, meta = models.last, result.metadata
        assert call["pipeline"] == "WanVACEPipeline", mode
        assert meta["reference_mode"] == mode and meta["reference_mode_applied"] is True
        assert meta["model"] == "wan2.1-vace" and "reference_error" not in meta
        assert len(video_frames(result.outputs[0].data)) == 5
        assert result.outputs[0].data != plain
        if mode == "single":
            assert call["video"] is None and call["mask"] is None and len(call["reference_images"]) == 1
        else:
            kept = {"start": [0], "end": [4], "both": [0, 4]}[mode]
            assert call["reference_images"] is None and len(call["video"]) == len(call["mask"]) == 5
            assert [int(np.asarray(m).max()) for m in call["mask"]] == [0 if i in kept else 255 for i in range(5)]
            colours = [tuple(np.asarray(f)[0, 0]) for f in call["video"]]
            for i in range(5):
                expected = (230, 20, 20) if (i == 0 and mode in ("start", "both")) else \
                    (20, 20, 230) if (i == 4 and mode in ("end", "both")) else (128, 128, 128)
                assert colours[i] == expected, (mode, i)


def test_vace_shares_text_encoder_tokenizer_and_vae(models):
    assert models._vace.text_encoder is models._t2v.text_encoder
    assert models._vace.tokenizer is models._t2v.tokenizer and models._vace.vae is models._t2v.vae
    assert models._vace.transformer is not models._t2v.transformer


def test_without_vace_references_are_reported_not_applied(wan_settings, t2v_only, media):
    handler = WanHandler(wan_settings, models=t2v_only)
    before = len(media.hits)
    result = handler.run(make_job(config={"first_frame": media.at("/frame.png")}), no_progress)
    meta = result.metadata
    assert meta["reference_mode"] == "start" and meta["reference_mode_applied"] is False
    assert "no VACE model installed" in meta["reference_error"] and meta["model"] == "wan2.1-t2v"
    assert len(media.hits) == before and t2v_only.last["pipeline"] == "WanPipeline"
    assert len(video_frames(result.outputs[0].data)) == 5


def test_unfetchable_reference_falls_back_by_default_and_fails_under_fail_policy(handler, models, wan_settings,
                                                                                 media):
    job = make_job(metadata={"end_reference_url": media.at("/missing.png")})
    result = handler.run(job, no_progress)
    meta = result.metadata
    assert meta["reference_mode"] == "end" and meta["reference_mode_applied"] is False
    assert meta["reference_error"].startswith("REFERENCE_FRAME_ERROR:") and "404" in meta["reference_error"]
    assert meta["model"] == "wan2.1-t2v" and models.last["pipeline"] == "WanPipeline"
    strict = handler_with(models, wan_settings, reference_failure_policy="fail")
    with pytest.raises(ReferenceFailure) as caught:
        strict.run(job, no_progress)
    assert caught.value.error_type is ErrorType.REFERENCE_FRAME_ERROR


def test_blocked_address_is_a_reference_error(models, wan_settings, media):
    strict = handler_with(models, wan_settings, reference_allow_hosts=frozenset())
    result = strict.run(make_job("image_fast", config={"image": media.at("/frame.png")}), no_progress)
    assert "loopback" in result.metadata["reference_error"] and not result.metadata["reference_mode_applied"]


# ----------------------------------------------------------------------------------------- loading
def test_cuda_dtype_policy_bf16_with_fp32_norms_and_vae(demo_models):
    """The load used on CUDA, run here on CPU: bf16 weights, fp32 norm/time-embedding/VAE, shared parts."""
    pipe = load_t2v(demo_models["wan"], torch.device("cpu"), torch.bfloat16)
    block = pipe.transformer.blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.bfloat16 and block.ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert block.norm2.weight.dtype == torch.float32 and block.scale_shift_table.dtype == torch.float32
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    assert next(pipe.transformer.condition_embedder.time_embedder.parameters()).dtype == torch.float32
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16
    vace = load_vace(demo_models["wan_vace"], pipe, torch.device("cpu"), torch.bfloat16)
    assert vace.text_encoder is pipe.text_encoder and vace.vae is pipe.vae
    assert vace.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_unload_and_reload(wan_settings, demo_models):
    from workers.wan.pipeline import WanModels
    models = WanModels(model_path=demo_models["wan"], vace_path=demo_models["wan_vace"], device="cpu")
    handler = WanHandler(wan_settings, models=models)
    handler.setup()
    assert handler.status()["loaded"] == {"t2v": True, "vace": True}
    assert handler.unload("vace") == "unloaded vace"
    result = handler.run(make_job("image_fast", config={"image": "http://127.0.0.1:9/x.png"}), no_progress)
    assert "VACE model is unloaded" in result.metadata["reference_error"]
    assert handler.unload("all") == "unloaded t2v"
    assert handler.status()["loaded"] == {"t2v": False, "vace": False}
    assert handler.load("all") == "loaded t2v, vace"


def test_fused_qkv_fuses_every_attention_of_both_transformers_and_keeps_the_frames(wan_settings, demo_models):
    """WAN_FUSE_QKV (off by default): every attention of the T2V and VACE transformers computes q/k/v (k/v for
    cross-attention) as one projection; a job's frames stay those of the unfused models within fp32 rounding."""
    import io

    from PIL import Image

    from workers.wan.pipeline import WanModels

    frames = {}
    for fused in (False, True):
        models = WanModels(model_path=demo_models["wan"], vace_path=demo_models["wan_vace"], device="cpu",
                           fuse_qkv=fused)
        handler = WanHandler(wan_settings, models=models)
        handler.setup()
        attention = [m for pipe in (models._t2v, models._vace) for m in pipe.transformer.modules()
                     if type(m).__name__ == "WanAttention"]
        assert attention and all(getattr(m, "fused_projections", False) == fused for m in attention)
        result = handler.run(make_job("image_fast"), no_progress)
        frames[fused] = np.asarray(Image.open(io.BytesIO(result.outputs[0].data)), dtype=np.int16)
        handler.unload("all")
    assert np.abs(frames[True] - frames[False]).max() <= 2

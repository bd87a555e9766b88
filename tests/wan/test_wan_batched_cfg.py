"""Batched classifier-free guidance (``BatchedCfgSampler``) against diffusers' two-pass ``WanPipeline`` on the
tiny demo WAN: same seed → the same latents after every step and the same frames (CPU fp32, within 1e-5
relative), for 1 and 5 frames, with and without a negative prompt, both solvers, and guidance ≤ 1 (one pass);
one batch-2 transformer forward per step instead of two; ``WAN_BATCHED_CFG`` switches the worker between them."""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from PIL import Image

from workers.wan.handler import WanHandler
from workers.wan.pipeline import WanModels, make_scheduler
from workers.wan.request import Solver
from workers.wan.sampler import BatchedCfgSampler
from workers.wan.settings import WanSettings

from .conftest import RecordingModels, make_job, no_progress

RTOL = 1e-5


def job_pipeline(models: WanModels, solver: Solver = Solver.UNIPC, shift: float = 5.0) -> WanPipeline:
    base = models._t2v
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       transformer=base.transformer, scheduler=make_scheduler(base.scheduler.config, solver, shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Forwards:
    """Counts the transformer's forwards and the batch size of each, through a forward pre-hook."""

    def __init__(self, transformer: torch.nn.Module):
        self.batches: list[int] = []
        self._handle = transformer.register_forward_pre_hook(
            lambda _module, _args, kwargs: self.batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)

    def close(self) -> None:
        self._handle.remove()


def sample(runner, transformer, **overrides):
    """Run ``runner`` (pipeline or sampler); latents after each step, the frames, the forwards' batch sizes."""
    steps: list[torch.Tensor] = []

    def keep(_pipe, _index, _t, tensors):
        steps.append(tensors["latents"].clone())
        return {}
    kwargs = dict(prompt="a cat sitting on a red chair", negative_prompt="", height=32, width=48, num_frames=5,
                  num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(11),
                  output_type="pt", callback_on_step_end=keep) | overrides
    forwards = Forwards(transformer)
    try:
        with torch.inference_mode():
            frames = runner(**kwargs).frames[0]
    finally:
        forwards.close()
    return steps, frames, forwards.batches


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("frames", [1, 5])
@pytest.mark.parametrize("negative", ["", "blurry, watermark, low quality"])
def test_batched_matches_the_two_pass_pipeline(models, frames, negative):
    transformer = models._t2v.transformer
    base_steps, base_frames, base_batches = sample(job_pipeline(models), transformer, num_frames=frames,
                                                   negative_prompt=negative)
    ours_steps, ours_frames, ours_batches = sample(BatchedCfgSampler(job_pipeline(models)), transformer,
                                                   num_frames=frames, negative_prompt=negative)
    assert base_batches == [1] * 6 and ours_batches == [2] * 3   # 3 steps: 6 passes → 3 batch-2 passes
    assert len(ours_steps) == len(base_steps) == 3
    for i, (ours, base) in enumerate(zip(ours_steps, base_steps)):
        assert ours.shape == base.shape and ours.dtype == base.dtype == torch.float32
        assert rel(ours, base) <= RTOL, (i, rel(ours, base))
    assert ours_frames.shape == base_frames.shape == (frames, 3, 32, 48)
    assert rel(ours_frames, base_frames) <= RTOL


def test_the_negative_prompt_and_the_guidance_change_the_result(models):
    sampler = lambda: BatchedCfgSampler(job_pipeline(models))   # noqa: E731
    transformer = models._t2v.transformer
    plain = sample(sampler(), transformer)[0][-1]
    negative = sample(sampler(), transformer, negative_prompt="blurry, watermark")[0][-1]
    stronger = sample(sampler(), transformer, guidance_scale=9.0)[0][-1]
    assert rel(negative, plain) > 1e-3 and rel(stronger, plain) > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_at_most_one_is_one_pass_of_batch_one(models, guidance):
    transformer = models._t2v.transformer
    base_steps, base_frames, base_batches = sample(job_pipeline(models), transformer, guidance_scale=guidance,
                                                   num_frames=1)
    ours_steps, ours_frames, ours_batches = sample(BatchedCfgSampler(job_pipeline(models)), transformer,
                                                   guidance_scale=guidance, num_frames=1)
    assert base_batches == ours_batches == [1] * 3
    assert rel(ours_steps[-1], base_steps[-1]) <= RTOL and rel(ours_frames, base_frames) <= RTOL


def test_dpmpp_with_shift_and_odd_sizes_match(models):
    """DPM++ (second order, flow shift 3) and a frame count the pipeline rounds (7 → 5); a size it refuses
    (not a multiple of 16) is refused the same way."""
    transformer = models._t2v.transformer
    pipe_args = dict(solver=Solver.DPMPP, shift=3.0)
    for runner in (job_pipeline(models), BatchedCfgSampler(job_pipeline(models))):
        with pytest.raises(ValueError, match="divisible by 16"):
            sample(runner, transformer, width=50)
    overrides = dict(num_frames=7, num_inference_steps=4, negative_prompt="fog")
    base_steps, base_frames, _ = sample(job_pipeline(models, **pipe_args), transformer, **overrides)
    ours_steps, ours_frames, batches = sample(BatchedCfgSampler(job_pipeline(models, **pipe_args)), transformer,
                                              **overrides)
    assert batches == [2] * 4 and ours_frames.shape == base_frames.shape == (5, 3, 32, 48)
    assert rel(ours_steps[-1], base_steps[-1]) <= RTOL and rel(ours_frames, base_frames) <= RTOL


def test_latent_output_is_the_last_step(models):
    pipe = job_pipeline(models)
    steps, latents, _ = sample(BatchedCfgSampler(pipe), pipe.transformer, output_type="latent", num_frames=1)
    assert torch.equal(latents, steps[-1][0]) and latents.shape == (16, 1, 4, 6)


def test_only_wan21_text_to_video_pipelines_are_supported(models):
    assert BatchedCfgSampler.supports(job_pipeline(models))
    assert not BatchedCfgSampler.supports(models._vace)
    with pytest.raises(ValueError):
        BatchedCfgSampler(models._vace)


def test_the_setting_switches_the_worker_path(wan_settings, models):
    assert WanSettings.from_env({}).wan_batched_cfg is True
    assert WanSettings.from_env({"WAN_BATCHED_CFG": "0"}).wan_batched_cfg is False
    assert WanModels.from_settings(replace(wan_settings, wan_batched_cfg=False)).batched_cfg is False
    two_pass = RecordingModels(model_path=wan_settings.wan_model_path, device="cpu", batched_cfg=False)
    two_pass.load("all")
    job = make_job("image_fast", config={"size": "48*32", "seed": 5}, negative_prompt="blurry")
    images = {}
    for name, loaded in (("batched", models), ("two_pass", two_pass)):
        handler = WanHandler(wan_settings, models=loaded)
        assert handler.status()["batched_cfg"] is (name == "batched")
        result = handler.run(job, no_progress)
        assert loaded.last["pipeline"] == "WanPipeline" and loaded.last["batched_cfg"] is (name == "batched")
        assert loaded.last["negative_prompt"] == "blurry"
        images[name] = result.outputs[0].data
    batched, two = (png_pixels(data) for data in images.values())
    assert batched.shape == two.shape == (32, 48, 3) and np.abs(batched - two).max() <= 1


def test_vace_jobs_keep_the_diffusers_vace_pipeline(handler, models, media):
    handler.run(make_job(config={"first_frame": media.at("/frame.png")}), no_progress)
    assert models.last["pipeline"] == "WanVACEPipeline" and models.last["batched_cfg"] is False


def test_batched_cfg_only_where_the_transformer_is_launch_bound():
    from workers.wan.pipeline import BATCHED_CFG_MAX_TOKENS, GenerationSpec, latent_tokens

    def spec(frames, width=832, height=480):
        return GenerationSpec("p", "", width, height, frames, 25, 6.5, 0)

    assert latent_tokens(spec(1)) == 1560 and latent_tokens(spec(81)) == 32760
    assert latent_tokens(spec(1)) <= BATCHED_CFG_MAX_TOKENS < latent_tokens(spec(81))
    assert latent_tokens(spec(17)) <= BATCHED_CFG_MAX_TOKENS  # short clips still batch


def test_only_launch_bound_shapes_are_graphed():
    from workers.wan.pipeline import BATCHED_CFG_MAX_TOKENS, small_latents

    frame = torch.zeros(2, 16, 1, 60, 104)                # one 832x480 frame: 1,560 tokens
    video = torch.zeros(1, 16, 21, 60, 104)               # 81 frames: 32,760 tokens
    text = torch.zeros(2, 512, 64)
    assert small_latents([frame, torch.zeros(2), text]) and not small_latents([video, text])
    assert not small_latents([text])                      # no latent video among the arguments
    edge = BATCHED_CFG_MAX_TOKENS // (60 * 104 // 4)
    assert small_latents([torch.zeros(1, 16, edge, 60, 104)]) != small_latents([torch.zeros(1, 16, edge + 1, 60, 104)])

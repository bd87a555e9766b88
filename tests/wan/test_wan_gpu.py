"""The CUDA path (skipped without a GPU): bf16 transformer and text encoder with fp32 norms, time embedding
and VAE; T2V and VACE runs produce the asked-for frames; the VACE pipeline shares the T2V modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.wan.handler import WanHandler
from workers.wan.pipeline import WanModels

from .conftest import RecordingModels, make_job, no_progress, png_pixels, png_size, video_frames

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_models(wan_settings):
    models = RecordingModels(model_path=wan_settings.wan_model_path, vace_path=wan_settings.wan_vace_model_path,
                             device="cuda")
    models.load("all")
    yield models
    models.unload("all")


def test_cuda_dtypes_and_sharing(cuda_models):
    t2v, vace = cuda_models._t2v, cuda_models._vace
    assert cuda_models.dtype == torch.bfloat16 and str(cuda_models.device).startswith("cuda")
    block = t2v.transformer.blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.bfloat16 and block.attn1.to_q.weight.is_cuda
    assert block.norm2.weight.dtype == torch.float32 and block.scale_shift_table.dtype == torch.float32
    assert t2v.vae.dtype == torch.float32 and t2v.text_encoder.dtype == torch.bfloat16
    assert vace.text_encoder is t2v.text_encoder and vace.vae is t2v.vae
    assert vace.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_cuda_video_and_image(cuda_models, wan_settings, solver):
    handler = WanHandler(wan_settings, models=cuda_models)
    video = handler.run(make_job(config={"sample_solver": solver, "frame_num": 9}), no_progress)
    assert len(video_frames(video.outputs[0].data)) == 9 and video.metadata["solver"] == solver
    image = handler.run(make_job("image_high", config={"size": "96*64", "sample_solver": solver}), no_progress)
    assert png_size(image.outputs[0].data) == (96, 64)


def test_cuda_vace_reference_modes(cuda_models, wan_settings, media):
    handler = WanHandler(wan_settings, models=cuda_models)
    for config in ({"image": media.at("/frame.png")}, {"first_frame": media.at("/frame.png"),
                                                       "last_frame": media.at("/frame.png?c=0,0,255")}):
        result = handler.run(make_job(config=config), no_progress)
        assert result.metadata["reference_mode_applied"] is True and cuda_models.last["pipeline"] == "WanVACEPipeline"
        assert len(video_frames(result.outputs[0].data)) == 5


def test_cuda_graphs_replay_and_change_nothing(wan_settings):
    graphed_models = WanModels(model_path=wan_settings.wan_model_path, device="cuda", cuda_graphs=True)
    eager_models = WanModels(model_path=wan_settings.wan_model_path, device="cuda", cuda_graphs=False)
    outputs = {}
    for name, models in (("graphs", graphed_models), ("eager", eager_models)):
        models.load("all")
        handler = WanHandler(wan_settings, models=models)
        job = make_job("image_fast", config={"size": "96*64", "seed": 3})
        outputs[name] = [handler.run(job, no_progress).outputs[0].data for _ in range(2)]
        handler.run(make_job(config={"frame_num": 9, "size": "96*64"}), no_progress)
    graphs = graphed_models.status()["cuda_graphs"]
    assert graphs["failure"] is None and graphs["graphs"] == 2 and graphs["replays"] > 0   # image and video shapes
    assert eager_models.status()["cuda_graphs"] is None
    assert outputs["graphs"][0] == outputs["graphs"][1] == outputs["eager"][0]
    graphed_models.unload("all")
    eager_models.unload("all")



def test_compiled_blocks_are_warmed_up_at_load_and_match_the_plain_blocks(wan_settings):
    """COMPILE_BLOCKS: every transformer block compiled at load, both variants a job needs (batch 1 and 2)
    compiled by the warm-up, so neither an image nor a video job compiles again; pixels as the plain blocks'
    within bf16 rounding."""
    from torch._dynamo.utils import counters

    compiled = WanModels(model_path=wan_settings.wan_model_path, device="cuda", cuda_graphs=True,
                         compile_blocks=True)
    plain = WanModels(model_path=wan_settings.wan_model_path, device="cuda", cuda_graphs=True,
                      compile_blocks=False)
    pixels, blocks = {}, {}
    for name, models in (("plain", plain), ("compiled", compiled)):
        models.load("all")
        blocks[name] = len(models._t2v.transformer.blocks)
        handler = WanHandler(wan_settings, models=models)
        graphs_before = counters["stats"]["unique_graphs"]
        pixels[name] = png_pixels(handler.run(make_job("image_fast", config={"size": "96*64", "seed": 3}),
                                              no_progress).outputs[0].data)
        handler.run(make_job(config={"frame_num": 9, "size": "96*64"}), no_progress)
        assert counters["stats"]["unique_graphs"] == graphs_before, name   # nothing compiled during jobs
        models.unload("all")
    assert compiled.status()["compiled_blocks"] == blocks["compiled"] > 0
    assert plain.status()["compiled_blocks"] == 0
    difference = np.abs(pixels["compiled"].astype(int) - pixels["plain"].astype(int))
    assert difference.mean() <= 3.0, difference.mean()

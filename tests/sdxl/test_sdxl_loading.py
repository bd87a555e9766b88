"""Model loading: single file and folder (offline), one set of weights, status without paths, unload/load,
and clear fatal errors for settings that cannot work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.core.errors import FatalWorkerError, InvalidJob
from workers.core.job import Queue
from workers.sdxl import SdxlHandler, create_handler
from workers.sdxl.pipeline import resolve_device

from .conftest import make_job, pixels, settings_for


def test_create_handler_implements_the_handler_protocol(sdxl_settings):
    handler = create_handler(sdxl_settings)
    assert isinstance(handler, SdxlHandler)
    assert (handler.queue, handler.kind) == (Queue.SDXL, "sdxl")
    assert handler.status()["loaded"] is False and handler.status()["model"] == "sdxl"


def test_single_file_status_and_shared_weights(sdxl_handler, shared_pipes, demo_models):
    status = sdxl_handler.status()
    assert status["loaded"] is True and status["model"] == "sdxl"   # the file stem, never a path
    assert (status["device"], status["dtype"], status["attention"]) == ("cpu", "float32", "sdpa")
    assert status["batch_sizes"] == [1, 3, 6] and status["torch_compile"] is False
    assert "/" not in str(status) and str(demo_models["sdxl"].parent) not in str(status)
    t2i, i2i = shared_pipes.t2i, shared_pipes.i2i
    assert i2i.unet is t2i.unet and i2i.vae is t2i.vae and i2i.text_encoder_2 is t2i.text_encoder_2
    assert status["shared_weights"] is True
    assert t2i.unet.dtype == torch.float32 and t2i.device.type == "cpu"


def test_folder_loads_and_matches_the_single_file(sdxl_handler, demo_models):
    folder = SdxlHandler(settings_for(demo_models["sdxl"], None))
    folder.setup()
    assert folder.status()["model"] == "sdxl"
    job = make_job(config={"seed": 4})
    from_folder = folder.run(job, lambda f, m: None)
    from_file = sdxl_handler.run(job, lambda f, m: None)
    assert np.abs(pixels(from_folder.outputs[0].data) - pixels(from_file.outputs[0].data)).max() <= 1
    # unload frees the pipelines; the next job loads them again
    assert folder.unload("all") == "SDXL model unloaded" and folder.status()["loaded"] is False
    assert folder.unload("sdxl") == "SDXL model was not loaded"
    again = folder.run(job, lambda f, m: None)
    assert folder.status()["loaded"] is True
    assert np.array_equal(pixels(again.outputs[0].data), pixels(from_folder.outputs[0].data))
    assert "already loaded" in folder.load("all")
    with pytest.raises(InvalidJob):
        folder.load("wan")


def test_xformers_only_when_installed(demo_models):
    handler = SdxlHandler(settings_for(demo_models["sdxl"], None, sdxl_attention="xformers"))
    handler.setup()
    status = handler.status()
    assert status["attention"] == "sdpa" and any("xformers" in note for note in status["notes"])


@pytest.mark.parametrize("overrides, words", [
    ({"sdxl_model_path": None}, "SDXL_MODEL_PATH"),
    ({"sdxl_config_path": None}, "SDXL_CONFIG_PATH"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "DEVICE"),
])
def test_settings_that_cannot_work_are_fatal_and_name_the_variable(demo_models, overrides, words):
    settings = settings_for(demo_models["sdxl_single_file"], demo_models["sdxl"], **overrides)
    with pytest.raises(FatalWorkerError) as caught:
        SdxlHandler(settings).setup()
    assert words in str(caught.value) and str(demo_models["sdxl"].parent) not in str(caught.value)


def test_missing_or_broken_model_is_fatal_without_paths(demo_models, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    for path in (tmp_path / "nothing-here", broken):
        with pytest.raises(FatalWorkerError) as caught:
            SdxlHandler(settings_for(path, demo_models["sdxl"])).setup()
        assert str(tmp_path) not in str(caught.value)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_img2img_twin_keeps_the_weights_dtype(demo_models):
    """diffusers' ``from_pipe`` casts shared modules to float32 unless told otherwise: the fp16 UNet of a GPU
    worker would silently become fp32 (found on an H100: 3-6x slower). bf16 on CPU stands in for fp16."""
    from diffusers import StableDiffusionXLPipeline

    from workers.sdxl.pipeline import SdxlPipelines

    t2i = StableDiffusionXLPipeline.from_pretrained(str(demo_models["sdxl"]), local_files_only=True,
                                                    dtype=torch.bfloat16)
    pipes = SdxlPipelines.from_t2i(t2i, torch.device("cpu"), "sdxl")
    assert pipes.i2i.unet is t2i.unet and pipes.dtype == torch.bfloat16
    assert {p.dtype for p in t2i.unet.parameters()} == {torch.bfloat16}
    assert t2i.text_encoder_2.dtype == torch.bfloat16 and t2i.vae.dtype == torch.bfloat16
    # an out-of-memory error inside diffusers' fp32 VAE decode leaves the VAE upcast; the next job must
    # still run (it failed on mixed dtypes before ``SdxlPipelines.restore``)
    t2i.vae.to(dtype=torch.float32)
    handler = SdxlHandler(settings_for(demo_models["sdxl"], None), loader=lambda _settings: pipes)
    result = handler.run(make_job(config={"seed": 1}), lambda f, m: None)
    assert len(result.outputs) == 1 and t2i.vae.dtype == torch.bfloat16


def test_compile_resnets_selects_the_resnet_blocks_too_and_changes_no_output(shared_pipes):
    """SDXL_COMPILE_RESNETS (off by default): the ResNet blocks join the transformer blocks that are compiled in
    place; dynamo's eager backend on the CPU (the real compile is CUDA-only) leaves every output as it was."""
    import copy

    from workers.gpu import regional
    from workers.sdxl.pipeline import COMPILED_BLOCKS, RESNET_BLOCKS
    from workers.sdxl.settings import SdxlSettings

    assert SdxlSettings.from_env({}).sdxl_compile_resnets is False
    assert SdxlSettings.from_env({"SDXL_COMPILE_RESNETS": "true"}).sdxl_compile_resnets is True
    unet = copy.deepcopy(shared_pipes.t2i.unet).eval()
    kinds = [type(m).__name__ for m in unet.modules()]
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 4, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    extra = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
    with torch.inference_mode():
        plain = unet(sample, 10, hidden, added_cond_kwargs=extra).sample
        torch._dynamo.reset()
        count = regional.compile_matching(unet, COMPILED_BLOCKS + RESNET_BLOCKS, backend="eager")
        compiled = unet(sample, 10, hidden, added_cond_kwargs=extra).sample
    resnets, transformers = kinds.count("ResnetBlock2D"), kinds.count("BasicTransformerBlock")
    assert count == resnets + transformers and resnets > 0 and transformers > 0
    torch.testing.assert_close(compiled, plain)
    assert regional.uncompile_blocks(unet) == count

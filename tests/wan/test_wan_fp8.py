"""WAN_FP8: the setting, the refusal where FP8 cannot run (the CPU), which linear layers it converts (bf16 block
linears only, never the fp32 keep-modules), and on a GPU of capability 8.9 or newer a tiny model run with FP8 on
against the same model in bf16."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from bench.models import cast_like_loader
from common.errors import ConfigError
from common.exit_codes import ExitCode
from workers.core.errors import FatalWorkerError
from workers.gpu import fp8
from workers.wan.handler import WanHandler
from workers.wan.pipeline import COMPILED_BLOCKS, WanModels, convert_fp8
from workers.wan.settings import WanSettings

from .conftest import make_job, no_progress, png_pixels, video_frames

ROOT = Path(__file__).resolve().parents[2]
FP8_GPU = torch.cuda.is_available() and fp8.unavailable_reason(torch.device("cuda")) is None
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def aligned_transformer(text_dim: int = 32) -> WanTransformer3DModel:
    """The demo transformer's layout with widths FP8 can take (multiples of 16; the demo's are 24)."""
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                 out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=128, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                 rope_max_seq_len=1024)


def test_wan_fp8_is_off_by_default_and_reaches_the_models():
    assert WanSettings.from_env({}).wan_fp8 is False
    settings = WanSettings.from_env({"WAN_FP8": "true"})
    assert settings.wan_fp8 is True and WanModels.from_settings(settings).options["fp8"] is True


def test_the_models_refuse_fp8_on_the_cpu_before_loading_anything(demo_models):
    models = WanModels(model_path=demo_models["wan"], device="cpu", fp8=True)
    with pytest.raises(ConfigError) as caught:
        models.load("all")
    assert str(caught.value) == "WAN_FP8 is on but FP8 needs CUDA capability ≥ 8.9; the device is cpu"
    assert not models.loaded


def test_wan_generate_exits_with_config_error_and_one_line(demo_models, tmp_path):
    """The CLI builds through ``WanModels.from_settings``, so it honours (and refuses) WAN_FP8 like the worker."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "WAN_FP8": "true",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "wan_generate.py"), "--prompt", "a cat", "--out",
                           str(tmp_path / "cat.png"), "--model-path", str(demo_models["wan"]), "--device", "cpu",
                           "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == ExitCode.CONFIG_ERROR, done.stderr[-2000:]
    assert ("wan_generate: configuration error: WAN_FP8 is on but FP8 needs CUDA capability ≥ 8.9; the device is "
            "cpu") in done.stderr.splitlines()
    assert not (tmp_path / "cat.png").exists()


def test_the_demo_transformer_has_no_layer_fp8_can_take(demo_models):
    """The demo's widths (24) are not multiples of 16: every block linear is kept, with why; the time embedder
    (fp32, outside the blocks) is not even considered."""
    transformer = cast_like_loader(WanPipeline.from_pretrained(demo_models["wan"]).transformer, torch.bfloat16)
    selection = fp8.select(transformer, COMPILED_BLOCKS)
    assert selection.names == ()
    assert set(selection.kept) == {f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS}
    assert all(reason.startswith("shape [") for reason in selection.kept.values())


def test_only_the_blocks_bf16_linears_are_selected_never_the_fp32_keep_modules():
    transformer = cast_like_loader(aligned_transformer(), torch.bfloat16)
    selection = fp8.select(transformer, COMPILED_BLOCKS)
    assert selection.names == tuple(f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS)
    assert selection.kept == {}
    whole = fp8.select(transformer, ("WanTransformer3DModel",))   # what quantising the whole model would meet
    assert whole.kept == {f"condition_embedder.time_embedder.linear_{i}":
                          "float32 weight (row-wise FP8 takes bf16 only)" for i in (1, 2)}
    assert set(selection.names) < set(whole.names)


def test_a_weight_with_an_all_zero_row_stays_bf16():
    transformer = cast_like_loader(aligned_transformer(), torch.bfloat16)
    with torch.no_grad():
        transformer.blocks[1].ffn.net[2].weight[5].zero_()
    selection = fp8.select(transformer, COMPILED_BLOCKS)
    assert selection.kept == {"blocks.1.ffn.net.2": "an all-zero weight row (its scale would be 0)"}
    assert len(selection.names) == 2 * len(BLOCK_LINEARS) - 1


@pytest.mark.skipif(FP8_GPU, reason="here torchao converts: the refusal is what a machine without FP8 sees")
def test_torchaos_refusal_is_a_fatal_load_error_naming_the_setting():
    transformer = cast_like_loader(aligned_transformer(), torch.bfloat16)
    with pytest.raises(FatalWorkerError) as caught:
        convert_fp8(transformer)
    assert "WAN_FP8" in str(caught.value)
    assert not any(fp8.is_float8(p) for p in transformer.parameters())


# -- on a GPU with FP8 ------------------------------------------------------------------------------------------
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA device of capability 8.9 or newer")


@pytest.fixture(scope="module")
def aligned_folder(demo_models, tmp_path_factory) -> Path:
    """The demo T2V pipeline with a transformer of FP8-able widths, saved as a diffusers folder."""
    pipe = WanPipeline.from_pretrained(demo_models["wan"])
    pipe.transformer = aligned_transformer(pipe.text_encoder.config.d_model)
    folder = tmp_path_factory.mktemp("wan-aligned")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.gpu
@needs_fp8_gpu
def test_fp8_on_a_gpu_converts_the_blocks_and_stays_close_to_bf16(aligned_folder, wan_settings):
    """Converted before the compile and the graphs: the single frame replays a graph of the fp8 weights, the
    compiled blocks trace them, and both outputs stay near the bf16 model's (random weights: noise pictures)."""
    runs = {"bf16": {"fp8": False, "compile_blocks": False}, "fp8": {"fp8": True, "compile_blocks": False},
            "fp8_compiled": {"fp8": True, "compile_blocks": True}}
    outputs, statuses = {}, {}
    for name, options in runs.items():
        models = WanModels(model_path=aligned_folder, device="cuda", cuda_graphs=True, **options)
        models.load("all")
        handler = WanHandler(wan_settings, models=models)
        image = handler.run(make_job("image_fast", config={"size": "96*64", "seed": 3}), no_progress)
        video = handler.run(make_job(config={"frame_num": 9, "size": "96*64", "seed": 3}), no_progress)
        outputs[name] = (png_pixels(image.outputs[0].data), np.stack(video_frames(video.outputs[0].data)))
        statuses[name] = models.status()
        models.unload("all")
    assert statuses["bf16"]["fp8_layers"] == 0
    assert statuses["fp8_compiled"]["compiled_blocks"] == 2 and statuses["fp8"]["compiled_blocks"] == 0
    for name in ("fp8", "fp8_compiled"):
        assert statuses[name]["fp8_layers"] == 2 * len(BLOCK_LINEARS)
        graphs = statuses[name]["cuda_graphs"]
        assert graphs["failure"] is None and graphs["replays"] > 0, (name, graphs)   # replayed with fp8 weights
        for ours, baseline in zip(outputs[name], outputs["bf16"]):
            difference = np.abs(ours.astype(int) - baseline.astype(int))
            assert ours.shape == baseline.shape and difference.mean() <= 6.0, (name, difference.mean())

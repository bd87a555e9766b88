"""``python -m bench levers --tiny``: the levers harness end to end on the CPU (the demo models' configs, dynamo
with its eager backend), so the GPU run spends its minutes measuring, not finding harness bugs."""
from __future__ import annotations

import pytest

from .conftest import run_tiny


@pytest.mark.timeout(300)
def test_every_lever_is_measured_and_compared_with_the_plain_module(demo_models, tmp_path):
    out = tmp_path / "levers.json"
    run, report = run_tiny(["levers"], demo_models["sdxl"].parent, out, timeout=280)
    assert run.returncode == 0 and not report["errors"], (report["errors"], run.stderr[-3000:])
    unet = report["sections"]["levers"]["sdxl_unet"]
    variants = ("graphed_cudnn_benchmark", "graphed_fused_qkv", "graphed_compiled_blocks_static",
                "graphed_compiled_blocks_dynamic", "graphed_compiled_blocks_and_resnets_static")
    assert unet["graphed_batch2"]["s"] > 0 and "rel_err" not in unet["graphed_batch2"]   # the reference
    for name in variants:
        entry = unet[f"{name}_batch2"]
        assert entry["s"] > 0 and entry["rel_err"] < 1e-5, (name, entry)  # fp32 on the CPU: the same math
    assert (
        unet["compiled_transformer_blocks"] > 0 and unet["compiled_resnet_blocks"] > unet["compiled_transformer_blocks"]
    )
    assert unet["vae_decode_fp32_cudnn_benchmark_batch1"]["rel_err"] < 1e-5
    wan = report["sections"]["levers"]["wan_transformer_video"]
    assert wan["compiled_blocks"] > 0 and wan["compiled_blocks_dynamic_batch1"]["rel_err"] < 1e-5
    for key, batch in ((unet, 2), (wan, 1)):
        errors = key[f"rel_err_to_fp32_batch{batch}"]
        assert errors and all(err < 1e-5 for err in errors.values()), errors   # fp32 everywhere on the CPU

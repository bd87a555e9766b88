"""``python -m bench fp8 --tiny``: on the CPU the section says why FP8 is skipped, and runs its whole harness with
the conversion left out (bf16 against itself: every error 0), rows and checks included, so the one GPU run
spends its minutes measuring, not finding harness bugs."""
from __future__ import annotations

import pytest

from .conftest import run_tiny


@pytest.mark.timeout(300)
def test_the_fp8_section_is_skipped_on_the_cpu_and_its_harness_runs(demo_models, tmp_path):
    out = tmp_path / "fp8.json"
    run, report = run_tiny(["fp8"], demo_models["sdxl"].parent, out, timeout=280)
    assert run.returncode == 0 and not report["errors"], (report["errors"], run.stderr[-3000:])
    section = report["sections"]["fp8"]
    assert section["skipped"] == "skipped: FP8 needs CUDA capability ≥ 8.9; the device is cpu"
    assert report["rows"] == [] and report["checks"] == []   # nothing measured on the CPU is reported as FP8
    dry = section["dry_run_report"]
    assert [row["key"] for row in dry["rows"]] == ["fp8_wan_step", "fp8_qwen_decode_1"]
    assert all(row["ours"] > 0 and row["baseline"] > 0 for row in dry["rows"])
    assert len(dry["checks"]) == 4 and all(check["passed"] for check in dry["checks"]), dry["checks"]
    assert section["dry_run_wan_cfg_step"]["fp8_batch1"]["rel_err"] == 0.0
    assert section["dry_run_wan_latents_rel_err_per_step"] == [0.0, 0.0, 0.0]
    qwen = section["dry_run_qwen"]
    assert qwen["logits_rel_err"] == 0.0 and qwen["argmax_agreement"] == 1.0 and qwen["fp8_layers"] == 0
    assert set(qwen["hidden_rel_err_per_layer"]) == {0.0} and qwen["equal_prefix_vs_bf16"] == 8

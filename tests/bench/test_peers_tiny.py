"""``python -m bench sdxl wan chat --tiny``: the library recipes (bench/peers.py, bench/peers_chat.py) run beside
our paths on the CPU with the demo models' configs, dynamo tracing included (its eager backend), so the one GPU
run measures instead of finding harness bugs. Reads the JSON the run writes."""
from __future__ import annotations

import pytest

from .conftest import run_tiny

WITH_LIBRARY = ("sdxl_3x1", "sdxl_3x3", "sdxl_4x1", "wan_image", "wan_video", "wan_video_step",
                "wan_video_step_fused_qkv", "qwen_ttft", "qwen_decode_1", "qwen_aggregate", "qwen_decode_1_compiled")


@pytest.mark.timeout(600)
def test_library_recipes_run_beside_ours_are_compared_and_undone(demo_models, tmp_path):
    """Exit 0, no error, every check passed (ours' and the recipes' outputs against eager, each recipe undone);
    every row with a recipe carries its figure and ratio, the others none; the diffusion recipes compiled their
    repeated blocks through dynamo (graphs made, blocks counted) and their errors against eager are fp32 rounding;
    transformers compiled the static-cache decode and generate_batch made every token; the table has the columns."""
    out = tmp_path / "bench.json"
    run, report = run_tiny(["sdxl", "wan", "chat"], demo_models["sdxl"].parent, out, timeout=580)
    failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["passed"]]
    assert run.returncode == 0 and not failed and not report["errors"], (
        failed, report["errors"], run.stdout[-3000:], run.stderr[-3000:])

    rows = {r["key"]: r for r in report["rows"]}
    for key in WITH_LIBRARY:
        row = rows[key]
        assert row["library"] > 0 and row["library_ratio"] > 0 and row["library_note"], row
    assert all(r["library"] is None and r["library_ratio"] is None for k, r in rows.items() if k not in WITH_LIBRARY)

    names = {c["name"] for c in report["checks"]}
    assert {"sdxl: library recipe undone, modules as before", "wan: library recipe undone, modules as before",
            "chat: library recipes undone, model as before"} <= names
    for section, cases in (("sdxl", ("3x1", "3x3", "4x1")), ("wan", ("image", "video"))):
        details = report["sections"][section]
        recipe = details["library_recipe"]
        assert recipe["compiled_blocks"] > 0 and recipe["dynamo_graphs"] > 0 and recipe["backend"] == "eager"
        assert recipe["warmup_s"] > 0 and not recipe["dynamo_suppress_errors"]
        assert details["library_dynamo_graphs_with_timed_calls"] == recipe["dynamo_graphs"]   # warm-up made them all
        for case in cases:
            assert details[f"library_{case}"]["latents_rel_err"] < 1e-4, (section, case)   # fp32: rounding only

    chat = report["sections"]["chat"]
    static, batch = chat["library_static"], chat["library_generate_batch"]
    assert static["compiled"] and static["compile_config"]["mode"] == "reduce-overhead"
    assert static["dynamo_graphs"]["first_call"] > 0 and static["dynamo_graphs"]["timed_calls"] == 0
    assert static["equal_prefix_vs_eager"] == [8] and len(static["ttft_s"]) == 3
    assert batch["tokens"] == 4 * 8 and batch["equal_prefix_vs_eager"] == [8] * 4

    table = run.stdout[run.stdout.rindex("| work"):]
    assert "| library" in table and "| vs library" in table


def test_each_recipe_changes_the_modules_and_its_undo_gives_them_back_exactly(demo_models):
    """The fingerprint sees what each recipe does (SDXL: fused layers added, UNet strides channels-last, blocks
    compiled; WAN: fused layers, blocks compiled) and nothing of it after the undo; without deleting the fused
    layers (diffusers' own unfuse leaves the older ``Attention``'s ``to_qkv``) the SDXL undo would not be exact."""
    from bench import models, peers
    from bench.profile import tiny

    profile = tiny(demo_models["sdxl"].parent)
    for recipe in (peers.sdxl_recipe(models.sdxl(profile)), peers.wan_recipe(models.wan(profile))):
        before = peers.fingerprint(recipe.modules)
        applied = recipe.apply()
        changed = peers.differences(before, peers.fingerprint(recipe.modules))
        assert applied["compiled_blocks"] > 0 and any(c.startswith("new ") and "to_" in c for c in changed), changed
        assert any(c.endswith(":compiled") for c in changed), changed
        recipe.undo()
        assert peers.differences(before, peers.fingerprint(recipe.modules)) == [], recipe.name

    pipe = models.sdxl(profile)
    before = peers.fingerprint({"unet": pipe.unet})
    pipe.fuse_qkv_projections()
    pipe.unfuse_qkv_projections()
    assert any(c.startswith("new unet.") and ".to_qkv." in c for c in peers.differences(before, peers.fingerprint(
        {"unet": pipe.unet})))
    peers.drop_fused_layers(pipe.unet)
    assert peers.differences(before, peers.fingerprint({"unet": pipe.unet})) == []


def test_a_library_figure_reaches_its_row_whichever_comes_first_and_rows_without_one_show_a_dash():
    from bench.report import Report, Row

    report = Report({})
    report.library("a", 2.0, "recipe")               # before its row, as the recipes run before ours
    report.add(Row("a", "work a", "s", baseline=4.0, ours=1.0))
    report.add(Row("b", "work b", "tok/s", baseline=10.0, ours=30.0))
    report.library("b", 20.0, "batched")             # after its row
    report.add(Row("c", "work c", "s", ours=1.0))
    rows = {r["key"]: r for r in report.to_dict()["rows"]}
    assert (rows["a"]["library"], rows["a"]["library_ratio"], rows["a"]["library_note"]) == (2.0, 2.0, "recipe")
    assert (rows["b"]["library"], rows["b"]["library_ratio"]) == (20.0, 1.5)
    assert rows["c"]["library"] is None and rows["c"]["library_ratio"] is None
    table = report.table().splitlines()
    assert table[0].split("|")[4].strip() == "library" and table[0].split("|")[7].strip() == "vs library"
    assert table[-1].split("|")[4].strip() == "-" and table[-1].split("|")[7].strip() == "-"
    with pytest.raises(TypeError, match="must be a number"):
        report.library("a", None, "no figure")

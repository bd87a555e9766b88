"""``wan_generate.py``: both flag spellings write a valid file through the worker's code; bad flags, bad
values, missing models and unusable references exit non-zero with one clear line."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import wan_generate

from .conftest import png_size, video_frames

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--size", "64*64", "--steps", "2", "--quiet"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "wan_generate.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_our_flags_write_a_video(demo_models, tmp_path, capsys):
    out = tmp_path / "cat.mp4"
    code = wan_generate.main(["--prompt", "a cat on a beach", "--model-path", str(demo_models["wan"]), *SMALL,
                              "--frames", "5", "--seed", "0", "--solver", "dpm++", "--shift", "3",
                              "--negative-prompt", "blurry", "--guidance", "5", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(video_frames(out.read_bytes())) == 5
    assert captured.out.startswith(f"wrote {out} (64x64 H.264, 5 frames") and "dpm++" in captured.out
    assert not list(tmp_path.glob(".*tmp*"))


def test_upstream_spellings_write_a_video_in_a_real_process(demo_models, tmp_path):
    out = tmp_path / "dog.mp4"
    done = cli("--task", "t2v-1.3B", "--ckpt_dir", str(demo_models["wan"]), "--prompt", "a dog running",
               "--size", "64*48", "--frame_num", "5", "--sample_steps", "2", "--sample_guide_scale", "6",
               "--sample_solver", "unipc", "--sample_shift", "5", "--base_seed", "7", "--offload_model", "True",
               "--save_file", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    frames = video_frames(out.read_bytes())
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
    assert "seed 7" in done.stdout and "denoising" in done.stderr   # the progress bar


def test_png_output_with_a_local_reference_frame(demo_models, tmp_path, capsys):
    first = tmp_path / "first.png"
    Image.new("RGB", (50, 30), (200, 10, 10)).save(first)
    out = tmp_path / "still.png"
    code = wan_generate.main(["--prompt", "a red sunset", "--model-path", str(demo_models["wan"]),
                              "--vace-model-path", str(demo_models["wan_vace"]), "--size", "48*32", "--steps", "1",
                              "--first_frame", str(first), "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert png_size(out.read_bytes()) == (48, 32) and "reference_error" not in captured.err


def test_bad_flag_exits_2_with_one_line():
    done = cli("--prompt", "x", "--bogus", timeout=30)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("unrecognized arguments: --bogus")


@pytest.mark.parametrize("args,fragment", [
    (["--frames", "0"], "invalid value: --frames must be an integer"),
    (["--size", "100*64"], "invalid value: --size must be W*H"),
    (["--resolution", "0x0"], "invalid value: --resolution"),
    (["--out", "x.gif"], "--out must end in .mp4"),
])
def test_bad_values_exit_2(args, fragment, tmp_path, capsys):
    argv = ["--prompt", "x", "--model-path", str(tmp_path), "--out", str(tmp_path / "o.mp4"), *args]
    assert wan_generate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_missing_model_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WAN_MODEL_PATH", raising=False)
    out = tmp_path / "o.mp4"
    assert wan_generate.main(["--prompt", "x", *SMALL, "--model-path", str(tmp_path / "nope"),
                              "--out", str(out)]) == 3
    assert "model error: the WAN model folder (WAN_MODEL_PATH) does not exist" in capsys.readouterr().err
    assert wan_generate.main(["--prompt", "x", *SMALL, "--out", str(out)]) == 3
    assert "no model: pass --model-path" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert wan_generate.main(["--prompt", "x", *SMALL, "--ckpt_dir", str(tmp_path / "empty"),
                              "--out", str(out)]) == 3
    assert "could not be loaded" in capsys.readouterr().err and not out.exists()


def test_unreadable_reference_exits_4(demo_models, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    code = wan_generate.main(["--prompt", "x", *SMALL, "--frames", "5", "--model-path", str(demo_models["wan"]),
                              "--vace-model-path", str(demo_models["wan_vace"]), "--last-frame",
                              str(tmp_path / "absent.png"), "--out", str(out)])
    assert code == 4 and "reference error: no such file: absent.png" in capsys.readouterr().err
    assert not out.exists()


HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "av", "workers", "common", "local", "redis")
HELP_PROBE = """
import json, runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
imported = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps({{"code": code, "imported": imported}}), file=sys.stderr)
"""


def test_help_prints_the_flags_without_importing_the_models_or_writing_anything(tmp_path):
    probe = HELP_PROBE.format(script=str(ROOT / "wan_generate.py"), heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"code": 0, "imported": []}
    assert done.stdout.startswith("usage: wan_generate.py") and "--ckpt_dir" in done.stdout
    assert list(tmp_path.iterdir()) == []


# Every model option set against ``WanModels``' own defaults, then the other way: a setting the CLI dropped
# would show as the constructor's default on its side only.
ENVIRONMENTS = {
    "against the defaults": {"WAN_BATCHED_CFG": "false", "CUDA_GRAPHS": "true", "COMPILE_BLOCKS": "true",
                             "TORCH_COMPILE": "true", "WAN_FP8": "true", "WAN_FUSE_QKV": "true", "DEVICE": "cpu"},
    "the other way": {"WAN_BATCHED_CFG": "true", "CUDA_GRAPHS": "false", "COMPILE_BLOCKS": "false",
                      "TORCH_COMPILE": "false", "WAN_FP8": "false", "WAN_FUSE_QKV": "false", "DEVICE": "auto"},
}


@pytest.mark.parametrize("environment", list(ENVIRONMENTS))
def test_the_cli_builds_its_models_with_the_workers_options(environment, tmp_path, monkeypatch):
    """One settings object through the worker's factory and the CLI's: the same models, every setting in them.
    Built, not loaded: no weights are read."""
    import workers.wan
    from workers.wan.pipeline import WanModels

    env = {**ENVIRONMENTS[environment], "WAN_MODEL_PATH": str(tmp_path / "t2v"),
           "WAN_VACE_MODEL_PATH": str(tmp_path / "vace")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    quiet = wan_generate.parse_args(["--prompt", "x", "--quiet"])
    settings = wan_generate.settings_from(quiet)
    worker = workers.wan.create_handler(settings).models
    cli = wan_generate.build_handler(quiet, settings).models
    assert set(cli.options) == set(inspect.signature(WanModels).parameters)   # every option is compared
    assert cli.options == worker.options and not worker.loaded and not cli.loaded
    assert cli.options == {"model_path": tmp_path / "t2v", "vace_path": tmp_path / "vace", "device": env["DEVICE"],
                           "compile_transformer": env["TORCH_COMPILE"] == "true", "progress_bar": False,
                           "batched_cfg": env["WAN_BATCHED_CFG"] == "true", "cuda_graphs": env["CUDA_GRAPHS"] == "true",
                           "compile_blocks": env["COMPILE_BLOCKS"] == "true", "fp8": env["WAN_FP8"] == "true",
                           "fuse_qkv": env["WAN_FUSE_QKV"] == "true"}
    shown = wan_generate.parse_args(["--prompt", "x"])
    with_bar = wan_generate.build_handler(shown, settings).models
    assert with_bar.options == {**worker.options, "progress_bar": True}   # the one difference: the CLI's bar

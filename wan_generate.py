#!/usr/bin/env python3
"""Generate one WAN 2.1 video (.mp4) or image (.png) from the command line, through the worker's own code.

    python wan_generate.py --prompt "a cat on a beach" --size 832*480 --frames 33 --out cat.mp4
    python wan_generate.py --task t2v-1.3B --ckpt_dir /models/wan --prompt "..." --frame_num 81 \\
        --sample_steps 50 --sample_guide_scale 6 --sample_solver unipc --sample_shift 5 --base_seed 42 \\
        --save_file out.mp4

The flags become a ``wan_queue`` job that ``workers.wan.WanHandler.run`` executes exactly as the worker
would (same parsing, defaults, reference conditioning, encoding); only references may also be local files.
Upstream Wan spellings are accepted next to ours. ``--offload_model`` is accepted for compatibility and has
no effect: the models stay resident on one device (the 1.3B model fits any GPU this fleet runs on).
Settings not given as flags come from the environment and build the models as the worker builds them
(WAN_MODEL_PATH, WAN_VACE_MODEL_PATH, DEVICE, WAN_BATCHED_CFG, CUDA_GRAPHS, COMPILE_BLOCKS, TORCH_COMPILE, ...).

Exit status: 0 = a valid file was written; 1 = generation or encoding failed; 2 = bad flag or value;
3 = model missing or unloadable; 4 = a reference image could not be used; 78 (``CONFIG_ERROR``, as every fleet
process) = a malformed setting in the environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_REFERENCE = 0, 1, 2, 3, 4
TASKS = ("t2v-1.3B", "t2v-14B")
FLAG_NAMES = {"config.frame_num": "--frames", "config.size": "--size", "config.resolution": "--resolution",
              "config.num_inference_steps": "--steps", "config.guidance_scale": "--guidance",
              "config.sample_shift": "--shift", "config.seed": "--seed", "config.negative_prompt": "--negative-prompt"}


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message = message
        self.code = code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wan_generate.py", description=__doc__.splitlines()[0],
                                epilog="Exit status: 0 ok, 1 generation failed, 2 bad flag or value, "
                                       "3 model missing, 4 reference failed, 78 malformed setting.")
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--negative-prompt", "--negative_prompt", "--n_prompt", dest="negative_prompt")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", help="W*H, e.g. 832*480 (sides multiples of 16, at most 1280)")
    size.add_argument("--resolution", help="WxH mapped to the native size of its orientation, e.g. 1024x576")
    p.add_argument("--frames", "--frame_num", dest="frames", type=int, help="frame count (4n+1, at most 81)")
    p.add_argument("--steps", "--sample_steps", dest="steps", type=int, help="denoising steps")
    p.add_argument("--guidance", "--sample_guide_scale", dest="guidance", type=float, help="CFG scale")
    p.add_argument("--solver", "--sample_solver", dest="solver", help="unipc (default) or dpm++")
    p.add_argument("--shift", "--sample_shift", dest="shift", type=float, help="flow shift (default 5.0)")
    p.add_argument("--seed", "--base_seed", dest="seed", type=int, help="seed (-1 or absent: random)")
    p.add_argument("--quality", choices=("fast", "high"), default="fast",
                   help="tier defaults: fast = 25 steps, guidance 6.5; high = 50 steps, guidance 7.5")
    p.add_argument("--image", help="reference image (VACE): local path or URL")
    p.add_argument("--first-frame", "--first_frame", dest="first_frame", help="first frame: path or URL")
    p.add_argument("--last-frame", "--last_frame", dest="last_frame", help="last frame: path or URL")
    p.add_argument("--enhance", action="store_true", help="rewrite the prompt through the chat worker first")
    p.add_argument("--model-path", "--ckpt_dir", dest="model_path", type=Path,
                   help="Wan 2.1 T2V diffusers folder (default: WAN_MODEL_PATH)")
    p.add_argument("--vace-model-path", "--vace_model_path", dest="vace_model_path", type=Path,
                   help="Wan 2.1 VACE folder, for reference frames (default: WAN_VACE_MODEL_PATH)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: DEVICE or auto)")
    p.add_argument("--out", "--save_file", dest="out", type=Path, default=Path("wan_output.mp4"),
                   help="output file: .mp4 (video) or .png (one frame); default wan_output.mp4")
    p.add_argument("--task", choices=TASKS, default="t2v-1.3B", help="accepted for compatibility")
    p.add_argument("--offload_model", "--offload-model", nargs="?", const="true",
                   help="accepted for compatibility; no effect (models stay resident)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build_job(args: argparse.Namespace):
    from workers.core.job import Job, JobType

    suffix = args.out.suffix.lower()
    if suffix not in (".mp4", ".png"):
        raise CliError("--out must end in .mp4 (video) or .png (image)", EXIT_USAGE)
    kind = "video" if suffix == ".mp4" else "image"
    config = {"size": args.size, "resolution": args.resolution, "frame_num": args.frames,
              "num_inference_steps": args.steps, "guidance_scale": args.guidance,
              "sample_solver": args.solver, "sample_shift": args.shift, "seed": args.seed,
              "negative_prompt": args.negative_prompt, "image": args.image, "first_frame": args.first_frame,
              "last_frame": args.last_frame, "enhance_prompt": args.enhance or None}
    config = {key: value for key, value in config.items() if value is not None}
    return Job(id="cli", type=JobType(f"{kind}_{args.quality}"), user_id="local", prompt=args.prompt,
               config=config)


class LocalOrRemoteFetcher:
    """References for the CLI: local files, or http(s) URLs through the worker's guarded fetcher."""

    def __init__(self, settings):
        from workers.core.references import ReferenceFetcher
        self.remote = ReferenceFetcher(settings)

    def fetch(self, location: str):
        from PIL import Image, UnidentifiedImageError

        from workers.core.references import ReferenceFailure

        if location.startswith(("http://", "https://")):
            return self.remote.fetch(location)
        try:
            with Image.open(Path(location).expanduser()) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise ReferenceFailure(f"no such file: {Path(location).name}") from None
        except (UnidentifiedImageError, OSError):
            raise ReferenceFailure(f"{Path(location).name} is not a readable image") from None


def settings_from(args: argparse.Namespace):
    """The WAN worker's settings (``ConfigError`` on a malformed variable), with the flags' overrides."""
    from workers.wan.settings import WanSettings

    settings = WanSettings.from_env(os.environ)
    overrides = {"wan_model_path": args.model_path, "wan_vace_model_path": args.vace_model_path,
                 "device": args.device}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def check_output(path: Path, expected_frames: int | None) -> str:
    """Decode the written file; a short description, or ``CliError`` when it is not a valid file."""
    if path.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(path) as image:
            if image.format != "PNG":
                raise CliError("the written file is not a PNG", EXIT_FAILED)
            return f"{image.width}x{image.height} PNG"
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        width, height = stream.codec_context.width, stream.codec_context.height
    if frames == 0 or (expected_frames is not None and frames != expected_frames):
        raise CliError(f"the written video has {frames} frames, expected {expected_frames}", EXIT_FAILED)
    return f"{width}x{height} H.264, {frames} frames, {frames / 16:.2f} s"


def build_handler(args: argparse.Namespace, settings):
    """The worker's handler over models built as the worker builds them (``WanModels.from_settings``: every
    setting honoured), with the CLI's progress bar, local reference files, and references that must work."""
    from workers.wan.handler import WanHandler
    from workers.wan.pipeline import WanModels

    models = WanModels.from_settings(settings, progress_bar=not args.quiet)
    return WanHandler(settings, models=models, fetcher=LocalOrRemoteFetcher(settings), reference_policy="fail")


def generate(args: argparse.Namespace) -> str:
    from workers.core.errors import FatalWorkerError, InvalidJob, WorkerError
    from workers.core.references import ReferenceFailure
    from workers.wan.request import from_job

    job = build_job(args)
    settings = settings_from(args)
    try:
        from_job(job, settings.max_prompt_chars)  # bad values fail before the model loads
    except InvalidJob as exc:
        message = exc.message
        for field, flag in FLAG_NAMES.items():
            message = message.replace(field, flag)
        raise CliError(f"invalid value: {message}", EXIT_USAGE) from None
    if settings.wan_model_path is None:
        raise CliError("no model: pass --model-path (or --ckpt_dir) or set WAN_MODEL_PATH", EXIT_MODEL)
    handler = build_handler(args, settings)
    started = time.monotonic()
    try:
        handler.setup()
    except FatalWorkerError as exc:
        raise CliError(f"model error: {exc}", EXIT_MODEL) from None
    try:
        result = handler.run(job, lambda fraction, message: None)
    except ReferenceFailure as exc:
        raise CliError(f"reference error: {exc.reason}", EXIT_REFERENCE) from None
    except WorkerError as exc:
        raise CliError(f"generation failed: {exc.message}", EXIT_FAILED) from None
    for key in ("reference_error", "enhancement_error", "solver_fallback"):
        if key in result.metadata:
            print(f"note: {key}: {result.metadata[key]}", file=sys.stderr)
    return write(args.out, result, started)


def write(out: Path, result, started: float) -> str:
    output = result.outputs[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        tmp.write_bytes(output.data)
        described = check_output(tmp, output.metadata.get("frame_num"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = result.metadata
    return (f"wrote {out} ({described}; seed {meta['seed']}, {meta['steps']} steps, {meta['solver']}, "
            f"guidance {meta['guidance_scale']:g}) in {time.monotonic() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # argparse exits with 2 and a one-line message on a bad flag
    from common.errors import ConfigError
    from common.exit_codes import ExitCode

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        print(generate(args))
        return EXIT_OK
    except CliError as exc:
        print(f"wan_generate: error: {exc.message}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"wan_generate: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"wan_generate: error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

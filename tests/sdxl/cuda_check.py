"""CUDA check of the SDXL handler at the production architecture (random weights): fp16, one set of weights,
timings for 1/3/6 images at 1024², img2img, a real out-of-memory ladder, optionally torch.compile.

Not collected by pytest (no GPU in CI). On a GPU machine with diffusers installed:

    python -m tests.sdxl.cuda_check --configs DIR --tokenizers DIR [--compile] [--out report.json]

``--configs`` holds the ``sdxl-*.json`` architecture files of ``shared/model-configs``; ``--tokenizers`` a
diffusers SDXL folder's ``tokenizer``/``tokenizer_2`` (the demo model's are enough: ids stay in the vocab).
"""
from __future__ import annotations

import argparse
import http.server
import io
import json
import socketserver
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from workers.core.errors import WorkerError
from workers.core.job import decode
from workers.sdxl import SdxlHandler
from workers.sdxl.pipeline import SdxlPipelines
from workers.sdxl.settings import SdxlSettings


def build_pipeline(configs: Path, tokenizers: Path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(name: str) -> dict:
        data = json.loads((configs / f"sdxl-{name}.json").read_text())
        return {k: v for k, v in data.items() if k not in ("architectures", "model_type", "_class_name",
                                                           "_diffusers_version")}

    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(load("unet")).half()
        vae = AutoencoderKL.from_config(load("vae")).half()
        te1 = CLIPTextModel(CLIPTextConfig(**load("text-encoder"))).half()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**load("text-encoder-2"))).half()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(load("scheduler")))


def serve_reference() -> tuple[socketserver.TCPServer, str]:
    buffer = io.BytesIO()
    Image.new("RGB", (1024, 768), (120, 60, 30)).save(buffer, format="PNG")
    body = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/ref.png"


def job(num_images: int, steps: int, **extra):
    body = {"id": "cuda-check", "type": "sdxl_image_fast", "user_id": "u", "prompt": "a cat on a red chair",
            "negative_prompt": "blurry", "config": {"num_images": num_images, "num_inference_steps": steps,
                                                   "seed": 7, "resolution": "1024x1024"}, "metadata": {}}
    for key, value in extra.items():
        body[key].update(value) if isinstance(value, dict) else body.__setitem__(key, value)
    return decode(json.dumps(body))


def timed(handler: SdxlHandler, the_job, repeats: int = 2) -> dict:
    walls, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = handler.run(the_job, lambda f, m: None)
        walls.append(time.perf_counter() - started)
    meta = result.metadata
    return {"wall_s": round(min(walls), 3), "generation_s": meta["generation_time"], "batch_size": meta["batch_size"],
            "images": len(result.outputs), "steps": meta["steps"], **{k: meta[k] for k in
            ("oom_retries", "denoise_strength", "denoising_steps", "reference_mode_applied") if k in meta}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", type=Path, required=True)
    parser.add_argument("--tokenizers", type=Path, required=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-oom", action="store_true")
    parser.add_argument("--quick", action="store_true", help="15 steps only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    started = time.perf_counter()
    t2i = build_pipeline(args.configs, args.tokenizers)
    t2i.set_progress_bar_config(disable=True)
    report["build_s"] = round(time.perf_counter() - started, 1)
    report["baseline"] = baseline(t2i)
    pipes = SdxlPipelines.from_t2i(t2i, torch.device("cuda"), "sdxl-random", compile_unet=args.compile)
    server, url = serve_reference()
    handler = SdxlHandler(SdxlSettings(device="cuda", reference_allow_hosts=frozenset({"127.0.0.1"})),
                          loader=lambda _settings: pipes)
    started = time.perf_counter()
    handler.setup()  # warms up torch.compile when on
    report["setup_s"] = round(time.perf_counter() - started, 1)
    report["status"] = handler.status()
    handler.run(job(1, 2), lambda f, m: None)  # cuDNN/cuBLAS warm-up
    for steps in (15,) if args.quick else (15, 25):
        for n in (1, 3, 6):
            torch.cuda.reset_peak_memory_stats()
            row = timed(handler, job(n, steps))
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            report[f"t2i_{steps}steps_{n}img"] = row
            print(f"t2i {steps} steps x{n}: {row}", flush=True)
    report["i2i_15steps_3img"] = timed(handler, job(3, 15, metadata={"reference_image_url": url,
                                                                     "reference_strength": 0.4}))
    report["exact_copy_1img"] = timed(handler, job(1, 15, prompt="", metadata={"reference_image_url": url,
                                                                               "exact_copy_mode": True}))
    print("img2img:", report["i2i_15steps_3img"], report["exact_copy_1img"], flush=True)
    for size in () if args.compile else ("1024x576", "832x1216"):  # compiled: each size recompiles
        report[f"t2i_15steps_3img_{size}"] = timed(handler, job(3, 15, config={"resolution": size}))
        print(size, report[f"t2i_15steps_3img_{size}"], flush=True)
    if not args.skip_oom:
        report["oom"] = oom_ladder(handler, report)
    server.shutdown()
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def baseline(t2i) -> dict:
    """Plain diffusers on the same modules, before the handler touches them (the reference timings)."""
    rows = {}
    for n in (1, 3, 6):
        def call():
            generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
            t2i("a cat on a red chair", negative_prompt="blurry", num_inference_steps=15, width=1024,
                height=1024, num_images_per_prompt=n, generator=generators)
        call()
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        rows[f"15steps_{n}img_s"] = round(time.perf_counter() - started, 3)
    print("plain diffusers:", rows, flush=True)
    return rows


def oom_ladder(handler: SdxlHandler, report: dict) -> list:
    """Cap this process's GPU memory below what a job of 6 peaks at, so it really runs out of memory and
    must recover (retry with VAE tiling, smaller batches) or fail with OOM_ERROR."""
    total = torch.cuda.get_device_properties(0).total_memory
    resident = torch.cuda.memory_allocated()
    one = report["t2i_15steps_1img"]["peak_gib"] * 2 ** 30
    six = report["t2i_15steps_6img"]["peak_gib"] * 2 ** 30
    rows = []
    for cap in (six - 2 ** 29, resident + (one - resident) * 0.5, resident + 2 ** 29):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            row = timed(handler, job(6, 15), repeats=1)
        except WorkerError as exc:
            row = {"error_type": exc.error_type.value, "message": exc.message}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        row["cap_gib"] = round(cap / 2 ** 30, 2)
        print("OOM ladder:", row, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())

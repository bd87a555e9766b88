"""Model load to ready, through each worker's own loader, from local safetensors.

Each model is built (seeded, random weights), saved with ``save_pretrained`` (safetensors), dropped from the
GPU, the page cache dropped when the machine allows it (else the read is from a warm cache, and the report
says so), then loaded and timed: SDXL ``SdxlHandler.setup()`` (``pipeline.load``), WAN
``WanHandler.setup()`` (``WanModels.load``), Qwen ``ModelStore.load``. The loaded parameters' dtypes are
compared with the built ones (the benchmark's models must be what production loads).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.chat.models import ModelName, ModelStore
from workers.chat.settings import ChatSettings
from workers.sdxl import SdxlHandler
from workers.sdxl import pipeline as sdxl_pipeline
from workers.sdxl.settings import SdxlSettings
from workers.wan.handler import WanHandler
from workers.wan.pipeline import WanModels
from workers.wan.settings import WanSettings

from . import models
from .context import Context
from .measure import free, timed
from .report import Row

SECTION = "load"
QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def folder_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 2)


def drop_page_cache() -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold (page cache dropped)"
    except OSError as exc:
        return f"warm (page cache not dropped: {type(exc).__name__})"


def _cache_policy(ctx: Context, size_gb: float) -> str:
    """Drop the page cache (a cold read, as at a worker's start) when the disk rate seen so far leaves time for
    it; otherwise read warm. Tiny CPU runs never touch the page cache."""
    if not ctx.profile.cuda:
        return "warm (CPU run: page cache left alone)"
    rate = ctx.shared.get("load_gb_per_s")
    if rate is not None and not ctx.deadline.allows(1.5 * size_gb / rate + 90):
        return f"warm (a cold read at {rate:.2f} GB/s would not fit the deadline)"
    return drop_page_cache()


def compare_dtypes(ctx: Context, name: str, built: dict[str, dict[str, str]], loaded: dict[str, Any]) -> None:
    differences = []
    for part, expected in built.items():
        actual = models.dtypes(loaded[part])
        differences += [f"{part}.{k}: built {v}, loaded {actual.get(k)}" for k, v in expected.items()
                        if actual.get(k) != v]
    ctx.report.check(f"{name} built dtypes = production loader's", not differences,
                     f"{len(differences)} differ" + (f", e.g. {differences[:3]}" if differences else ""))


def _measure(ctx: Context, name: str, folder: Path, build: Callable[[], tuple[dict, Callable[[Path], None]]],
             load: Callable[[], dict[str, Any]]) -> None:
    dev = ctx.profile.device
    built, save = build()
    save_s, _ = timed(lambda: save(folder), dev)
    save = None  # the last reference to the built model: free it before the load
    free(dev)
    size = folder_gb(folder)
    cache = _cache_policy(ctx, size)
    load_s, loaded = timed(load, dev)
    if cache.startswith("cold"):
        ctx.shared["load_gb_per_s"] = size / load_s
    ctx.report.detail(SECTION, name, {"save_s": round(save_s, 1), "load_s": round(load_s, 2), "size_gb": size,
                                      "cache": cache})
    ctx.report.add(Row(f"load_{name}", f"{name} load to ready ({size} GB safetensors, {cache.split(' ')[0]})", "s",
                       ours=round(load_s, 2), target="report", note=cache))
    compare_dtypes(ctx, name, built, loaded)
    loaded = None  # drop the references (free the memory) before what follows
    free(dev)


def sdxl(ctx: Context, folder: Path) -> None:
    p = ctx.profile
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")

    def build():
        pipe = models.sdxl(p)
        return {n: models.dtypes(getattr(pipe, n)) for n in parts}, pipe.save_pretrained

    def load():
        loaded: list[Any] = []

        def loader(settings: SdxlSettings):
            loaded.append(sdxl_pipeline.load(settings))
            return loaded[-1]
        SdxlHandler(SdxlSettings(sdxl_model_path=folder, device=p.device.type), loader=loader).setup()
        return {n: getattr(loaded[-1].t2i, n) for n in parts}

    _measure(ctx, "SDXL", folder, build, load)


def wan(ctx: Context, folder: Path) -> None:
    p = ctx.profile
    parts = ("transformer", "vae", "text_encoder")

    def build():
        pipe = models.wan(p)
        return {n: models.dtypes(getattr(pipe, n)) for n in parts}, pipe.save_pretrained

    def load():
        settings = WanSettings(wan_model_path=folder, device=p.device.type)
        wan_models = WanModels.from_settings(settings)
        WanHandler(settings, models=wan_models).setup()
        pipe = wan_models._t2v  # the loaded pipeline (WanModels exposes no accessor); read only
        return {n: getattr(pipe, n) for n in parts}

    _measure(ctx, "WAN", folder, build, load)


def qwen(ctx: Context, folder: Path) -> None:
    p = ctx.profile

    def build():
        model, _tokenizer = models.qwen(p)

        def save(path: Path) -> None:
            model.save_pretrained(path)
            for name in QWEN_TOKENIZER_FILES:
                source = p.tokenizer_path("qwen-instruct") / name
                if source.exists():
                    shutil.copy(source, path / name)
        return {"model": models.dtypes(model)}, save

    def load():
        store = ModelStore(ChatSettings(qwen_instruct_path=folder, device=p.device.type))
        return {"model": store.load(ModelName.INSTRUCT).model}

    _measure(ctx, "Qwen", folder, build, load)


def run(ctx: Context, root: Path | None = None) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-load-", dir=root))
    started = time.perf_counter()
    try:
        for name, needs, measure in (("sdxl", 45, sdxl), ("qwen", 70, qwen), ("wan", 80, wan)):
            ctx.step(SECTION, name, needs, lambda measure=measure, name=name: measure(ctx, root / name))
            shutil.rmtree(root / name, ignore_errors=True)
            free(ctx.profile.device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ctx.report.detail(SECTION, "total_s", round(time.perf_counter() - started, 1))

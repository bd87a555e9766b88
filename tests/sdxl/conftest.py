"""SDXL test fixtures: the tiny demo SDXL (built once per session), one resident handler, and a loopback
server of reference images."""
from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every load below must work without the hub

import numpy as np
import pytest
from flask import Flask, Response, request
from PIL import Image

from local.net import BackgroundServer
from tests.jobs import producer_job
from workers.core.job import Job
from workers.sdxl import SdxlHandler
from workers.sdxl.pipeline import SdxlPipelines
from workers.sdxl.settings import SdxlSettings

SMALL = {"resolution": "64x64", "num_inference_steps": 2}


def make_job(prompt: str = "a cat sitting on a red chair", *, type: str = "sdxl_image_fast",
             small: bool = True, **fields: Any) -> Job:
    """An sdxl_queue job as the app sends it (the current producer's ``["{json}"]`` form); ``config`` and
    ``metadata`` given here are merged over the small test defaults."""
    return producer_job(type, prompt, SMALL, small=small, **fields)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def settings_for(model: Path, config: Path | None, **overrides: Any) -> SdxlSettings:
    values: dict[str, Any] = dict(sdxl_model_path=model, sdxl_config_path=config, device="cpu",
                                  reference_allow_hosts=frozenset({"127.0.0.1"}),
                                  reference_timeout_seconds=5.0)
    values.update(overrides)
    return SdxlSettings(**values)


@pytest.fixture(scope="session")
def sdxl_settings(demo_models) -> SdxlSettings:
    """The production shape: a single-file checkpoint plus SDXL_CONFIG_PATH for offline loading."""
    return settings_for(demo_models["sdxl_single_file"], demo_models["sdxl"])


@pytest.fixture(scope="session")
def sdxl_handler(sdxl_settings) -> SdxlHandler:
    handler = SdxlHandler(sdxl_settings)
    handler.setup()
    return handler


@pytest.fixture(scope="session")
def shared_pipes(sdxl_handler) -> SdxlPipelines:
    return sdxl_handler._pipes


def handler_with(pipes: SdxlPipelines, settings: SdxlSettings) -> SdxlHandler:
    """Another handler (other settings) over the already loaded pipelines: no second load."""
    handler = SdxlHandler(settings, loader=lambda _settings: pipes)
    handler.setup()
    return handler


def _noise_png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _reference_app() -> Flask:
    app = Flask("sdxl-references")

    @app.get("/ref.png")
    def reference():
        args = request.args
        return Response(_noise_png(int(args.get("w", 64)), int(args.get("h", 64)), int(args.get("seed", 1))),
                        mimetype="image/png")

    @app.get("/missing.png")
    def missing():
        return Response("gone", status=404)

    @app.get("/text.png")
    def text():
        return Response("this is not an image", mimetype="image/png")

    return app


class ReferenceServer(BackgroundServer):
    def __init__(self) -> None:
        super().__init__(_reference_app(), name="sdxl-references")

    def at(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="session")
def references() -> Iterator[ReferenceServer]:
    server = ReferenceServer()
    yield server
    server.stop()

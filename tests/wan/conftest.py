"""WAN test fixtures: the tiny demo WAN + VACE models (built once per session), one resident model set whose
pipeline calls are recorded (a test seam around the real diffusers call), a loopback server of reference
images that counts its requests, and a fake chat worker (``POST /enhance``) whose behaviour a test picks."""
from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every load below must work without the hub

import av
import numpy as np
import pytest
from flask import Flask, Response, jsonify, request
from PIL import Image

from common.settings import Secret
from local.net import BackgroundServer
from tests.jobs import producer_job
from workers.core.job import Job
from workers.wan.handler import WanHandler
from workers.wan.pipeline import WanModels
from workers.wan.sampler import BatchedCfgSampler
from workers.wan.settings import WanSettings

SMALL = {"size": "64*64", "num_inference_steps": 2, "frame_num": 5, "seed": 11}
CHAT_KEY, WAN_KEY = "test-chat-key", "test-wan-key"


def make_job(type: str = "video_fast", prompt: str = "a cat sitting on a red chair", *, small: bool = True,
             job_id: str = "job-1", **fields: Any) -> Job:
    """A wan_queue job in the current producer's ``["{json}"]`` form; ``config``/``metadata`` given here are
    merged over the small test defaults."""
    return producer_job(type, prompt, SMALL, job_id=job_id, small=small, **fields)


def video_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def no_progress(fraction: float, message: str) -> None:
    return None


class RecordingModels(WanModels):
    """The real ``WanModels``; each pipeline call's keyword arguments are recorded before it runs, with the
    diffusers pipeline's class name and whether the batched-CFG sampler ran around it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls: list[dict[str, Any]] = []

    def _job_pipeline(self, spec, vace):
        pipe = super()._job_pipeline(spec, vace)
        calls = self.calls
        batched = isinstance(pipe, BatchedCfgSampler)
        name = type(pipe.pipe if batched else pipe).__name__

        def call(**kwargs):
            calls.append({"pipeline": name, "batched_cfg": batched, "scheduler": pipe.scheduler, **kwargs})
            return pipe(**kwargs)
        return call

    @property
    def last(self) -> dict[str, Any]:
        return self.calls[-1]


# ----------------------------------------------------------------------------------------- servers
def _png(color: tuple[int, int, int], size: tuple[int, int] = (80, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


class MediaServer(BackgroundServer):
    """``/frame.png?c=R,G,B`` (80×48 solid image), ``/missing.png`` (404); ``hits`` counts requests."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        app = Flask("wan-media")

        @app.get("/frame.png")
        def frame():
            self.hits.append(request.full_path)
            color = tuple(int(c) for c in request.args.get("c", "200,30,30").split(","))
            return Response(_png(color), mimetype="image/png")

        @app.get("/missing.png")
        def missing():
            self.hits.append(request.full_path)
            return Response("gone", status=404)

        super().__init__(app, name="wan-media")

    def at(self, path: str) -> str:
        return f"{self.url}{path}"


class FakeChatWorker(BackgroundServer):
    """The chat worker's ``POST /enhance`` as CONTRACT §5 describes it. ``mode``: ``ok`` (answers
    ``"<prefix><user text>"``), ``slow`` (sleeps ``delay`` s first), ``garbage`` (a 200 without the field),
    ``error`` (500). ``requests`` records (headers, body)."""

    def __init__(self) -> None:
        self.mode, self.delay, self.prefix = "ok", 3.0, "vivid cinematic shot: "
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        app = Flask("fake-chat")

        @app.post("/enhance")
        def enhance():
            body = request.get_json(force=True)
            self.requests.append(({k.lower(): v for k, v in request.headers.items()}, body))
            if request.headers.get("Authorization") != f"Bearer {CHAT_KEY}":
                return jsonify({"success": False, "error": "bad key"}), 401
            if self.mode == "slow":
                time.sleep(self.delay)
            if self.mode == "error":
                return jsonify({"success": False, "error": "boom"}), 500
            if self.mode == "garbage":
                return jsonify({"success": True})
            user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
            return jsonify({"success": True, "enhanced_prompt": f"  {self.prefix}{user}  ",
                            "generation_time": 0.01, "tokens_generated": 7, "model_info": {}})

        super().__init__(app, name="fake-chat")

    def reset(self) -> None:
        self.mode, self.delay = "ok", 3.0
        self.requests.clear()


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def media() -> Iterator[MediaServer]:
    server = MediaServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chat_server() -> Iterator[FakeChatWorker]:
    server = FakeChatWorker()
    yield server
    server.stop()


@pytest.fixture
def chat(chat_server) -> FakeChatWorker:
    chat_server.reset()
    return chat_server


@pytest.fixture(scope="session")
def wan_settings(demo_models, chat_server) -> WanSettings:
    return WanSettings(wan_model_path=demo_models["wan"], wan_vace_model_path=demo_models["wan_vace"], device="cpu",
                    reference_allow_hosts=frozenset({"127.0.0.1"}), reference_timeout_seconds=5.0,
                    chat_worker_url=chat_server.url, chat_worker_api_key=Secret(CHAT_KEY),
                    wan_worker_api_key=Secret(WAN_KEY), wan_enhance_timeout_seconds=1.0)


@pytest.fixture(scope="session")
def models(wan_settings) -> RecordingModels:
    loaded = RecordingModels(model_path=wan_settings.wan_model_path, vace_path=wan_settings.wan_vace_model_path,
                             device="cpu")
    loaded.load("all")
    return loaded


@pytest.fixture(scope="session")
def t2v_only(wan_settings) -> RecordingModels:
    """The same T2V checkpoint without a VACE model installed."""
    loaded = RecordingModels(model_path=wan_settings.wan_model_path, device="cpu")
    loaded.load("all")
    return loaded


@pytest.fixture
def handler(wan_settings, models) -> WanHandler:
    return WanHandler(wan_settings, models=models)


def handler_with(models: WanModels, settings: WanSettings, **overrides: Any) -> WanHandler:
    """Another handler with other settings over already loaded models (no second load)."""
    return WanHandler(replace(settings, **overrides), models=models)



def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))

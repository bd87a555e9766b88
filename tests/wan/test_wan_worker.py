"""The WAN worker as production runs it (``python -m workers wan`` under gunicorn) on real Redis and the
Supabase stand-in: a job in the producer's form → 0.mp4 + thumbnail in storage → a completed callback whose
metadata reports the reference mode; an image job → 0.png; WAN's ``POST /enhance`` on the worker's port."""
from __future__ import annotations

import json

import pytest
import requests

from tests.procs import WorkerProcess, runtime_env

from .conftest import CHAT_KEY, WAN_KEY, png_size, video_frames


@pytest.fixture
def worker(redis_server, redis_client, supabase_standin, demo_models, chat_server, tmp_path):
    chat_server.reset()
    env = runtime_env(redis_server.url, supabase_standin, tmp_path / "storage",
                      WAN_MODEL_PATH=str(demo_models["wan"]), WAN_VACE_MODEL_PATH=str(demo_models["wan_vace"]),
                      DEVICE="cpu", REFERENCE_ALLOW_HOSTS="127.0.0.1", CHAT_WORKER_URL=chat_server.url,
                      CHAT_WORKER_API_KEY=CHAT_KEY, WAN_WORKER_API_KEY=WAN_KEY, HF_HUB_OFFLINE="1")
    proc = WorkerProcess(env, kind="wan", handler=None, log_path=tmp_path / "wan.log")
    try:
        yield proc.wait_healthy(timeout=120)
    finally:
        proc.close()


def element(job_id: str, **fields) -> str:
    job = {"id": job_id, "type": "video_fast", "job_type": "wan_video_fast", "user_id": "user-1",
           "prompt": "a red ball rolling", "config": {"size": "64*48", "num_inference_steps": 2, "frame_num": 5,
                                                      "seed": 4},
           "metadata": {"destination": "library"}}
    for key, value in fields.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) else value
    return json.dumps([json.dumps(job)])


def test_video_and_image_jobs_through_the_worker_process(worker, redis_client, supabase_standin, media,
                                                         tmp_path):
    redis_client.rpush("wan_queue", element("wan-job-1", metadata={"start_reference_url": media.at("/frame.png")}),
                       element("wan-job-2", type="image_high", job_type="image_high"))
    done = supabase_standin.wait_for("wan-job-1", timeout=120).body
    [asset] = done["assets"]
    assert asset["type"] == "video" and asset["url"] == "user-1/wan-job-1/0.mp4"
    assert asset["thumbnail_url"] == "user-1/wan-job-1/0.thumb.webp"
    assert asset["metadata"]["frame_num"] == 5 and asset["metadata"]["fps"] == 16
    meta = done["metadata"]
    assert meta["reference_mode"] == "start" and meta["reference_mode_applied"] is True
    assert meta["job_type"] == "video_fast" and meta["frame_num"] == 5 and "destination" not in meta
    stored = tmp_path / "storage/workspace-temp/user-1/wan-job-1"
    assert len(video_frames((stored / "0.mp4").read_bytes())) == 5 and (stored / "0.thumb.webp").is_file()
    image = supabase_standin.wait_for("wan-job-2", timeout=120).body
    assert image["assets"][0]["url"] == "user-1/wan-job-2/0.png" and image["assets"][0]["type"] == "image"
    assert png_size((tmp_path / "storage/workspace-temp/user-1/wan-job-2/0.png").read_bytes()) == (64, 48)
    assert image["metadata"]["steps"] == 2 and image["metadata"]["guidance_scale"] == 7.5

    response = requests.post(f"{worker.url}/enhance", json={"prompt": "a city"},
                             headers={"Authorization": f"Bearer {WAN_KEY}"}, timeout=10)
    assert response.status_code == 200 and response.json()["enhanced_prompt"] == "vivid cinematic shot: a city"
    assert requests.post(f"{worker.url}/enhance", json={"prompt": "a city"}, timeout=10).status_code == 401
    status = requests.get(f"{worker.url}/status", timeout=10).json()
    assert status["model"]["loaded"] == {"t2v": True, "vace": True}

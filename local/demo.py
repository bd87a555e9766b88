"""``make demo``: the whole fleet on this machine, one job of each family end to end.

Builds the tiny demo models, starts a real redis-server, an Upstash-REST front (jobs are pushed exactly as the
app's producer does: ``POST /rpush/<queue>`` with body ``["{...}"]``), the Supabase stand-in (callbacks and
registration) and a reference-image server; then runs ``python -m orchestrator`` in local mode (storage in a
directory), pushes the jobs, calls ``/chat`` and ``/enhance``, prints a table of what happened and stops the
fleet cleanly. Exit status 0 only when every job completed and every call answered 200.

Sizes are small (tiny random-weight models on CPU): the outputs are noise, the paths and formats are real.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from local.demo_models import build as build_models
from local.net import free_port
from local.redis_server import RedisServer
from local.supabase_standin import SupabaseStandin
from local.upstash_front import UpstashFront

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
KEYS = {"service": "demo-service-key", "secret": "demo-callback-secret", "client": "demo-client-key",
        "admin": "demo-admin-key", "upstash": "demo-upstash-token"}
USER = "demo-user"


@dataclass
class Step:
    name: str
    queue: str = ""
    job_id: str = ""
    started: float = field(default_factory=time.monotonic)
    status: str = "queued"
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    note: str = ""


def jobs(reference_url: str) -> list[tuple[str, str, dict]]:
    small_sdxl = {"resolution": "256x256", "num_inference_steps": 4}
    small_wan = {"size": "128*128", "num_inference_steps": 3}
    return [
        ("SDXL, 3 images", "sdxl_queue", {"type": "sdxl_image_fast", "prompt": "a lighthouse at dusk",
                                           "config": {**small_sdxl, "num_images": 3, "seed": 7}}),
        ("SDXL img2img", "sdxl_queue", {"type": "sdxl_image_high", "prompt": "same, in watercolour",
                                         "config": {**small_sdxl, "pipeline": "img2img", "denoise_strength": 0.6},
                                         "metadata": {"reference_image_url": reference_url}}),
        ("WAN video", "wan_queue", {"type": "video_fast", "job_type": "wan_video_fast", "prompt": "waves",
                                     "config": {**small_wan, "frame_num": 9, "seed": 3}}),
        ("WAN image", "wan_queue", {"type": "image_fast", "prompt": "a red fox", "config": dict(small_wan)}),
        ("WAN video, enhanced", "wan_queue", {"type": "video7b_fast_enhanced", "prompt": "a city at night",
                                               "config": {**small_wan, "frame_num": 5}}),
        ("chat_queue", "chat_queue", {"type": "chat_conversation", "prompt": "",
                                       "config": {"messages": [{"role": "user", "content": "Say hello"}],
                                                  "max_tokens": 16}}),
    ]


def fleet_env(models: dict[str, Path], redis: RedisServer, standin: SupabaseStandin, ports: dict[str, int]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTASH_", "SUPABASE_", "REDIS_"))}
    env.update({
        "REDIS_URL": redis.url, "SUPABASE_URL": standin.url, "SUPABASE_SERVICE_KEY": KEYS["service"],
        "JOB_CALLBACK_SECRET": KEYS["secret"], "STORAGE_DIR": str(VAR / "demo" / "storage"),
        "WAN_WORKER_API_KEY": KEYS["client"], "CHAT_WORKER_API_KEY": KEYS["client"],
        "WORKER_ADMIN_KEY": KEYS["admin"], "REFERENCE_ALLOW_HOSTS": "127.0.0.1",
        "SDXL_MODEL_PATH": str(models["sdxl_single_file"]), "SDXL_CONFIG_PATH": str(models["sdxl"]),
        "WAN_MODEL_PATH": str(models["wan"]), "WAN_VACE_MODEL_PATH": str(models["wan_vace"]),
        "QWEN_INSTRUCT_PATH": str(models["qwen_instruct"]), "QWEN_BASE_PATH": str(models["qwen_base"]),
        "CHAT_WORKER_URL": f"http://127.0.0.1:{ports['chat']}",
        "MEMORY_MANAGER_URL": f"http://127.0.0.1:{ports['memory']}",
        "MEMORY_MANAGER_PORT": str(ports["memory"]), "ROUTER_PORT": str(ports["router"]),
        "SDXL_PORT": str(ports["sdxl"]), "CHAT_PORT": str(ports["chat"]), "WAN_PORT": str(ports["wan"]),
        "REGISTRATION_PORT": str(ports["registration"]),
        "ORCHESTRATOR_STATUS_PORT": str(ports["status"]), "LOG_DIR": str(VAR / "demo" / "log"),
        "MEMORY_CAPACITY_GB": "80", "QUEUE_POLL_MAX_SECONDS": "0.5", "WORKER_HEARTBEAT_TTL_SECONDS": "10",
        "FLEET_STOP_GRACE_SECONDS": "60", "PYTHONUNBUFFERED": "1",
    })
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the orchestrator exited with {proc.returncode}; see var/demo/fleet.log")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy within {timeout:.0f} s")


def push(front: UpstashFront, queue: str, job: dict) -> None:
    """Exactly what the app's producer does: POST /rpush/<queue> with the body ["<job json>"]."""
    body = json.dumps([json.dumps(job)])
    answer = requests.post(f"{front.url}/rpush/{queue}", data=body,
                           headers={"Authorization": f"Bearer {front.token}"}, timeout=10)
    answer.raise_for_status()


def call(name: str, url: str, body: dict, key: str) -> Step:
    step = Step(name)
    try:
        answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        data = answer.json()
        step.status = "200" if answer.ok else str(answer.status_code)
        text = data.get("response") or data.get("enhanced_prompt") or data.get("error") or ""
        step.note = text.replace("\n", " ")[:60]
    except (requests.RequestException, ValueError) as exc:
        step.status, step.note = "error", type(exc).__name__
    step.seconds = time.monotonic() - step.started
    return step


def run_jobs(front: UpstashFront, standin: SupabaseStandin, reference_url: str, timeout: float) -> list[Step]:
    steps = []
    for name, queue, job in jobs(reference_url):
        step = Step(name, queue, str(uuid.uuid4()))
        push(front, queue, {"id": step.job_id, "user_id": USER, **job})
        steps.append(step)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(s.status in ("queued", "processing") for s in steps):
        for step in steps:
            received = standin.callbacks(step.job_id)
            if not received:
                continue
            last = received[-1].body
            if step.status in ("queued", "processing") and last["status"] != step.status:
                step.status = last["status"]
                step.seconds = time.monotonic() - step.started
                step.outputs = [a["url"] for a in last["assets"]]
                meta = last["metadata"]
                step.note = (last.get("error_message") or meta.get("response")
                             or meta.get("enhanced_prompt") or "")[:60].replace("\n", " ")
                print(f"  {step.name}: {step.status} after {step.seconds:.1f} s", flush=True)
        time.sleep(0.5)
    return steps


def print_table(steps: list[Step]) -> None:
    print(f"\n{'job / call':<22} {'status':<10} {'seconds':>8}  outputs / answer")
    print("-" * 100)
    for step in steps:
        detail = ", ".join(step.outputs) if step.outputs else step.note
        print(f"{step.name:<22} {step.status:<10} {step.seconds:>8.1f}  {detail}")


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    (VAR / "demo").mkdir(parents=True, exist_ok=True)
    print("building the tiny demo models (var/models) ...", flush=True)
    models = build_models(VAR / "models")
    ports = {name: free_port() for name in ("memory", "router", "registration", "sdxl", "chat", "wan", "status")}
    with RedisServer() as redis, SupabaseStandin(KEYS["service"], KEYS["secret"]) as standin:
        front = UpstashFront(redis.url, KEYS["upstash"])
        refs = _reference_server()
        log_file = open(VAR / "demo" / "fleet.log", "wb")
        print(f"starting the fleet (router :{ports['router']}, chat :{ports['chat']}; log var/demo/fleet.log)",
              flush=True)
        fleet = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, stdout=log_file,
                                 stderr=subprocess.STDOUT, env=fleet_env(models, redis, standin, ports))
        try:
            for port in (ports["router"], ports["chat"], ports["wan"], ports["sdxl"]):
                wait_healthy(f"http://127.0.0.1:{port}/health", fleet, 300)
            print("fleet healthy; pushing one job of each family", flush=True)
            steps = run_jobs(front, standin, f"{refs.url}/image.png", timeout=600)
            chat = f"http://127.0.0.1:{ports['chat']}"
            steps += [
                call("POST :chat /chat", f"{chat}/chat",
                     {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}, KEYS["client"]),
                call("POST :chat /enhance", f"{chat}/enhance",
                     {"messages": [{"role": "user", "content": "a cat"}], "max_tokens": 16}, KEYS["client"]),
                call("POST :router /enhance", f"http://127.0.0.1:{ports['router']}/enhance",
                     {"prompt": "a cat on a roof"}, KEYS["client"]),
            ]
            print_table(steps)
            memory = requests.get(f"http://127.0.0.1:{ports['memory']}/memory/status", timeout=10).json()
            print("\nmemory manager /memory/status (GPUs and reservations):")
            for gpu in memory.get("gpus", []):
                print("  " + json.dumps({k: v for k, v in gpu.items() if k != "reservations"}))
            for reservation in memory.get("reservations", []):
                print(f"  reservation {reservation['id']}: {reservation['worker']} {reservation['gb']} GB"
                      f" on GPU {reservation['gpu']}")
            print(f"\noutputs are under {VAR / 'demo' / 'storage'}")
            ok = all(s.status in ("completed", "200") for s in steps)
        finally:
            print("stopping the fleet ...", flush=True)
            fleet.send_signal(signal.SIGTERM)
            try:
                code = fleet.wait(120)
            except subprocess.TimeoutExpired:
                fleet.kill()
                code = fleet.wait()
            print(f"orchestrator exited with {code}")
            refs.stop()
            front.stop()
            log_file.close()
    print("demo " + ("succeeded: every job completed" if ok else "FAILED: see the table and var/demo/fleet.log"))
    return 0 if ok and code == 0 else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo takes no options; parsing still answers ``--help`` before anything is built or started."""
    parser = argparse.ArgumentParser(
        prog="python -m local.demo", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=f"Writes {VAR / 'models'} and {VAR / 'demo'} (storage/, fleet.log); the models are random-weight, "
               "so the pictures are noise and the text gibberish.")
    return parser.parse_args(argv)


def _reference_server():
    """A loopback HTTP server with one reference image (for the img2img job)."""
    import io

    from flask import Flask, Response
    from PIL import Image

    from local.net import BackgroundServer

    app = Flask("demo-references")
    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((320, 240)).save(buffer, format="PNG")

    @app.get("/image.png")
    def image():
        return Response(buffer.getvalue(), mimetype="image/png")

    return BackgroundServer(app, name="demo-references")


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench fleet [--tiny]``: the whole fleet on two GPUs with full-size random-weight models (issue 9).

1. Builds SDXL, WAN T2V and Qwen2.5-7B instruct from ``bench/configs`` (random weights, ``save_pretrained``),
   three processes at once (``bench/fleet_models.py``).
2. Starts a real redis-server, the Supabase stand-in (callbacks + Storage) and ``python -m orchestrator``
   with GPU placement A (default ``sdxl:0,chat:0,wan:1``), the memory manager on, everything on loopback.
3. Checks placement (the placement variables of every worker process; with nvidia-smi which GPU each
   worker's CUDA process is on) and the memory manager's per-GPU ledger (one entry per GPU, totals = NVML).
4. Runs each family alone, then all three at once through the real queues (+ concurrent ``POST /chat``):
   throughput, latencies, exactly-once (``bench/fleet_jobs.py``).
5. Restarts the fleet with placement B (default ``sdxl:0,chat:1,wan:1``) and makes WAN need room on a full
   GPU (``bench/fleet_room.py``): chat on that GPU must be unloaded, SDXL on the other must not.

``--tiny``: the demo models' configs on the CPU, ``GPU_COUNT=2`` and the memory manager's capacity probe
(a check of the harness, ~2 minutes on 2 cores). The JSON goes to ``--json``, else ``$OUT/fleet.json``; it
is rewritten after every step; logs go next to it. Every process is stopped at the end, also on errors,
SIGTERM and Ctrl-C. ``--redis-server`` / ``REDIS_SERVER_BIN`` / ``.redisbin/redis-server``: the server binary.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .measure import Deadline
from .report import Report, Row

SECTION_A, SECTION_B = "scenario_a", "scenario_b"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="demo-model configs on the CPU, two pretend GPUs")
    p.add_argument("--json", type=Path, help="the JSON report (default $OUT/fleet.json)")
    p.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole run (phases that would "
                   "not fit are cut down or skipped)")
    p.add_argument("--demo", type=Path, help="an existing demo models folder (tokenizers; tiny configs)")
    p.add_argument("--work-dir", type=Path, help="where the model folders go (default: a temp dir, removed)")
    p.add_argument("--redis-server", help="redis-server binary (else REDIS_SERVER_BIN, .redisbin/, PATH)")
    p.add_argument("--placement-a", default="sdxl:0,chat:0,wan:1")
    p.add_argument("--placement-b", default="sdxl:0,chat:1,wan:1", help="chat and WAN must share a GPU")
    p.add_argument("--sdxl-batches", default="1,1,6", help="one SDXL job per number (images per job)")
    p.add_argument("--wan-images", type=int, default=3)
    p.add_argument("--wan-videos", type=int, default=1, help="video_fast jobs (81 frames; dropped when short "
                   "of time)")
    p.add_argument("--chat-http", type=int, default=16, help="concurrent POST /chat calls")
    p.add_argument("--chat-jobs", type=int, default=4, help="chat_conversation jobs on chat_queue")
    p.add_argument("--chat-tokens", type=int, help="max_tokens per chat (default 128; tiny 8)")
    p.add_argument("--skip-alone", action="store_true", help="no per-family bursts before the joint one")
    p.add_argument("--skip-b", action="store_true", help="no scenario B")
    return p.parse_args(argv)


def placement_of(text: str) -> dict[str, int]:
    pairs = (item.split(":") for item in text.split(",") if item.strip())
    return {name.strip(): int(index) for name, index in pairs}


class FleetRun:
    def __init__(self, args: argparse.Namespace, report: Report, deadline: Deadline):
        from . import fleet_jobs, fleet_rig

        self.args, self.report, self.deadline = args, report, deadline
        self.tiny = args.tiny
        sizes = fleet_jobs.Sizes.tiny() if args.tiny else fleet_jobs.Sizes()
        if args.chat_tokens:
            sizes = dataclasses.replace(sizes, chat_tokens=args.chat_tokens)
        self.sizes = sizes
        self.keys = fleet_rig.Keys()
        self.scratch = fleet_rig.scratch_dir(args.work_dir)
        self.logs = (report.path.parent if report.path else self.scratch) / "fleet-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis = self.standin = self.fleet = self.ballast = None
        self.models: dict[str, dict] = {}
        self.gpu_count = 2
        self.visible: list[str] = ["0", "1"]
        self.totals: list[float] = []

    # ------------------------------------------------------------------ helpers
    def check(self, name: str, passed: bool, detail: str) -> None:
        self.report.check(name, passed, detail)
        self.report.save()

    def detail(self, section: str, key: str, value: Any) -> None:
        self.report.detail(section, key, value)
        self.report.save()

    def step(self, section: str, name: str, needs: float, fn) -> Any:
        if not self.deadline.allows(needs):
            self.detail(section, f"skipped:{name}", f"needs ~{needs:.0f} s, {self.deadline.left():.0f} s left")
            print(f"[skip] {section}/{name}: needs ~{needs:.0f} s, {self.deadline.left():.0f} s left", flush=True)
            return None
        print(f"[step] {section}/{name} at {self.deadline.elapsed():.0f} s", flush=True)
        began = time.monotonic()
        try:
            return fn()
        finally:
            self.detail(section, f"{name}_s", round(time.monotonic() - began, 1))

    # ------------------------------------------------------------------ phases
    def prepare(self) -> None:
        from . import fleet_gpu, fleet_models, fleet_rig

        binary, how = fleet_rig.redis_binary(self.args.redis_server)
        self.detail("setup", "redis_server", {"binary": binary, "found_by": how,
                                               "version": fleet_rig.expose_redis(binary, self.scratch)})
        if self.tiny:
            self.totals = [80.0, 80.0]
        else:
            smi = fleet_gpu.nvidia_smi()
            if smi is None or not smi["gpus"]:
                raise RuntimeError("the full fleet run needs nvidia-smi and GPUs (use --tiny on the CPU)")
            listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            self.gpu_count = min(len(smi["gpus"]), len(listed)) if listed else len(smi["gpus"])
            self.visible = fleet_gpu.expected_visible(self.gpu_count, os.environ.get("CUDA_VISIBLE_DEVICES"))
            total = {g["index"]: g["total_mib"] / 1024 for g in smi["gpus"]}
            self.totals = [total[fleet_gpu.physical_index(self.visible, i, smi)] for i in range(self.gpu_count)]
            self.detail("setup", "gpus_at_start", smi)
            self.report.meta["gpus"] = fleet_gpu.gpu_names()
        self.detail("setup", "gpu_count", self.gpu_count)
        demo = self.args.demo
        if demo is None:
            from local.demo_models import build

            demo = self.scratch / "demo"
            build(demo, {"sdxl", "wan", "qwen"})
        devices = {"sdxl": None, "wan": None, "qwen": None} if self.tiny else {
            "sdxl": self.visible[0], "wan": self.visible[1 % self.gpu_count], "qwen": self.visible[0]}
        began = time.monotonic()
        self.models = fleet_models.build_all(self.scratch / "models", demo, self.tiny, devices,
                                             timeout=300 if not self.tiny else 240, log_dir=self.logs)
        self.detail("models", "built", self.models)
        self.detail("models", "wall_s", round(time.monotonic() - began, 1))
        failed = {k: v["error"][-300:] for k, v in self.models.items() if "error" in v}
        self.check("models built and saved (SDXL, WAN T2V, Qwen instruct)", not failed,
                   str(failed) if failed else ", ".join(f"{k} {v['size_gb']} GB in {v['build_s']}+{v['save_s']} s"
                                                         for k, v in self.models.items()))
        if failed:
            raise RuntimeError(f"model build failed: {list(failed)}")
        from local.redis_server import RedisServer
        from local.supabase_standin import SupabaseStandin

        self.redis = RedisServer()
        self.standin = SupabaseStandin(self.keys.service, self.keys.callback)
        self.client = self.redis.client()

    def fleet_settings(self, placement: str, tag: str) -> dict[str, str]:
        k, m = self.keys, self.models
        settings = {
            "REDIS_URL": self.redis.url, "SUPABASE_URL": self.standin.url, "SUPABASE_SERVICE_KEY": k.service,
            "JOB_CALLBACK_SECRET": k.callback, "WAN_WORKER_API_KEY": k.client, "CHAT_WORKER_API_KEY": k.client,
            "WORKER_ADMIN_KEY": k.admin, "SDXL_MODEL_PATH": m["sdxl"]["path"], "WAN_MODEL_PATH": m["wan"]["path"],
            "QWEN_INSTRUCT_PATH": m["qwen"]["path"], "GPU_COUNT": str(self.gpu_count), "GPU_PLACEMENT": placement,
            "MEMORY_PROBE": "capacity" if self.tiny else "auto", "MEMORY_CAPACITY_GB": f"{self.totals[0]:g}",
            "MEMORY_SAFETY_MARGIN_GB": "1", "MEMORY_RELOAD_QUIET_SECONDS": "10",
            "LOG_DIR": str(self.scratch / f"logs-{tag}"), "FLEET_STOP_GRACE_SECONDS": "20",
            "FLEET_KILL_AFTER_SECONDS": "5", "FLEET_UNHEALTHY_RESTART_CHECKS": "30",
            "FLEET_COMMAND_CHAT": "{python} -m workers chat --port {port} --host 127.0.0.1",
            "FLEET_COMMAND_ROUTER": "{python} -m router --port {port} --host 127.0.0.1",
            "QUEUE_POLL_MAX_SECONDS": "0.5", "WORKER_HEARTBEAT_TTL_SECONDS": "10", "CALLBACK_TIMEOUT_SECONDS": "30",
        }
        if self.tiny:
            settings.update({"DEVICE": "cpu", "OMP_NUM_THREADS": "1", "FLEET_HEALTH_INTERVAL_SECONDS": "2"})
        return settings

    def start_fleet(self, section: str, placement: str, tag: str) -> None:
        from .fleet_rig import Orchestrated, fleet_env, free_ports

        env = fleet_env(self.fleet_settings(placement, tag), free_ports())
        self.fleet = Orchestrated(env, self.logs / f"fleet-{tag}.log")
        began = time.monotonic()
        self.fleet.start()
        programs = self.fleet.wait_running(min(300.0 if not self.tiny else 200.0, max(30.0, self.deadline.left())))
        self.detail(section, "start_to_all_running_s", round(time.monotonic() - began, 1))
        self.detail(section, "ports", self.fleet.ports)
        self.detail(section, "programs", {n: {k: p.get(k) for k in ("state", "pid", "gpu", "restarts")}
                                          for n, p in programs.items()})

    def observe(self, section: str, tag: str, placement: dict[str, int]) -> dict:
        from . import fleet_gpu

        programs = self.fleet.status()
        procs = fleet_gpu.processes(programs)
        smi = fleet_gpu.nvidia_smi()
        checks, record = fleet_gpu.placement_checks(tag, placement, procs, self.visible, smi)
        code, status = self.fleet.http.get(self.fleet.url("memory_manager") + "/memory/status")
        if code != 200:
            raise RuntimeError(f"memory manager /memory/status: HTTP {code}")
        checks += fleet_gpu.ledger_checks(tag, status, self.gpu_count, self.totals, 0.05 if self.tiny else 1.0,
                                          placement)
        for check in checks:
            self.check(*check)
        devices = {w: self.fleet.http.get(self.fleet.url(w) + "/memory/status")[1].get("device")
                   for w in placement}
        held = fleet_gpu.worker_memory(procs, smi)
        self.detail(section, "placement", {"expected": placement, "visible_devices": self.visible,
                                           "processes": procs, **record})
        self.detail(section, "worker_devices", devices)
        self.detail(section, "memory_manager", {"probe": status.get("probe"), "policy": status.get("policy"),
                                                "reservations": status.get("reservations"),
                                                "gpus": fleet_gpu.gpu_table(status, smi)})
        if held:
            sizes = {w: v["size_gb"] for w, v in status.get("policy", {}).items()}
            self.detail(section, "reserved_vs_held_gib", {w: {"reserved": sizes.get(w), "held_nvml": held.get(w)}
                                                          for w in placement})
        return procs

    def scenario_a(self) -> None:
        placement = placement_of(self.args.placement_a)
        self.step(SECTION_A, "start", 60, lambda: self.start_fleet(SECTION_A, self.args.placement_a, "a"))
        if self.fleet is None:
            return
        self.observe(SECTION_A, "A", placement)
        self.concurrency()

    def concurrency(self) -> None:
        from . import fleet_jobs as fj

        a, s = self.args, self.sizes
        batches = [int(b) for b in a.sdxl_batches.split(",") if b.strip()]
        reserve = 0.0 if a.skip_b or self.tiny else 150.0
        video_s = 45.0 if not self.tiny else 10.0
        est = {"sdxl": 5 + sum(2.5 if b == 1 else 5.5 for b in batches), "wan": 5 + 1.5 * a.wan_images,
               "chat": 10.0}
        videos = a.wan_videos
        alone_total = sum(est.values()) + videos * video_s
        together = max(est.values()) + videos * video_s + 15
        if not self.deadline.allows(reserve + (0 if a.skip_alone else alone_total) + together) and videos:
            videos = 0
            self.detail(SECTION_A, "videos_dropped", f"{self.deadline.left():.0f} s left")
        specs = {"sdxl": fj.sdxl_specs(s, batches), "wan": fj.wan_specs(s, a.wan_images, videos),
                 "chat": fj.chat_specs(s, a.chat_http, a.chat_jobs)}
        est["wan"] += videos * video_s
        together = max(est.values()) + 15
        timeout = 240.0 if not self.tiny else 150.0
        alone: dict[str, dict] = {}
        for family in ([] if a.skip_alone else fj.FAMILIES):
            done = self.step(SECTION_A, f"alone_{family}", reserve + est[family] + together,
                             lambda f=family: self.burst(f"alone_{f}", specs[f], timeout))
            if done:
                alone[family] = done[family]
        joint = self.step(SECTION_A, "together", reserve + together,
                          lambda: self.burst("together", [x for f in fj.FAMILIES for x in specs[f]], timeout))
        if joint:
            self.rows(alone, joint, batches, videos)

    def burst(self, name: str, specs: list, timeout: float) -> dict:
        from . import fleet_jobs as fj

        timeout = min(timeout, max(20.0, self.deadline.left() - 40))  # leave time to tear down
        outcomes, t0 = fj.run_burst(self.client, self.standin, self.fleet.url("chat") + "/chat", self.keys.client,
                                    specs, timeout)
        queues = fj.drained(self.client)
        fj.recount(self.standin, outcomes)
        summary = fj.summarize(outcomes, t0)
        self.detail(SECTION_A, name, {"families": summary, "queues_after": queues, "problems": fj.problems(outcomes)})
        every = [f"{f}: {v['completed']}/{v['jobs']}" for f, v in summary.items()]
        self.check(f"A {name}: every job and call completed, each queue job with exactly one terminal callback",
                   all(v["exactly_once"] for v in summary.values()), ", ".join(every))
        self.check(f"A {name}: queues, processing lists and outbox empty afterwards, nothing dead",
                   not any(queues.values()), str(queues))
        return summary

    def rows(self, alone: dict, joint: dict, batches: list[int], videos: int) -> None:
        s = self.sizes
        work = {"sdxl": f"SDXL {s.sdxl_resolution} fast, batches {batches}",
                "wan": f"WAN {s.wan_size} image_fast x{self.args.wan_images}"
                       + (f" + video_fast {s.video_frames} frames x{videos}" if videos else ""),
                "chat": f"chat {self.args.chat_http} x POST /chat + {self.args.chat_jobs} jobs, {s.chat_tokens} tokens"}
        for family, together in joint.items():
            base = alone.get(family, {})
            self.report.add(Row(f"fleet_{family}_span", f"{work[family]}: span (baseline = alone, ours = all "
                                "three at once)", "s", base.get("span_s"), together.get("span_s"),
                                note=f"p50 latency alone {base.get('latency_p50_s')} / together "
                                     f"{together.get('latency_p50_s')} s"))
        chat = joint.get("chat", {})
        self.report.add(Row("fleet_chat_tok_s", "chat generated tokens/s (baseline = alone, ours = together)",
                            "tok/s", alone.get("chat", {}).get("tokens_per_s"), chat.get("tokens_per_s")))
        self.report.save()

    def scenario_b(self) -> None:
        from . import fleet_gpu
        from .fleet_rig import Ballast
        from .fleet_room import RoomScenario

        placement = placement_of(self.args.placement_b)
        gpu = placement["wan"]
        if placement.get("chat") != gpu or placement.get("sdxl") == gpu:
            raise ValueError("--placement-b must put chat and WAN on one GPU and SDXL on another")
        if self.fleet is not None and self.args.placement_b != self.args.placement_a:
            self.stop_fleet(SECTION_A, "A")
        if not self.tiny:
            self.ballast = Ballast(self.visible[gpu], self.logs / "ballast.log")
        if self.fleet is None:
            self.step(SECTION_B, "start", 60, lambda: self.start_fleet(SECTION_B, self.args.placement_b, "b"))
        if self.fleet is None:
            return
        if self.ballast is not None:
            try:
                self.detail(SECTION_B, "ballast_ready", self.ballast.answer(120))
            except (RuntimeError, TimeoutError, ValueError) as exc:  # fill the ledger instead (as --tiny does)
                self.detail(SECTION_B, "ballast_failed", f"{type(exc).__name__}: {exc}; GPU filled in the ledger")
                self.ballast.close()
                self.ballast = None
        procs = self.observe(SECTION_B, "B", placement)
        scenario = RoomScenario(self.fleet, self.fleet.http, gpu, 1.0, self.ballast, self.check,
                                lambda key, value: self.detail(SECTION_B, key, value))
        self.step(SECTION_B, "wan_needs_room", 30, lambda: scenario.run(
            self.client, self.standin, self.sizes, self.keys.client, placement, procs,
            job_timeout=min(180.0 if not self.tiny else 90.0, max(20.0, self.deadline.left() - 40)),
            reload_wait=min(60.0, self.deadline.left() - 30)))
        self.detail(SECTION_B, "gpus_end", fleet_gpu.gpu_table(
            self.fleet.http.get(self.fleet.url("memory_manager") + "/memory/status")[1], fleet_gpu.nvidia_smi()))

    def stop_fleet(self, section: str, tag: str) -> None:
        stopped = self.fleet.stop(60)
        self.fleet = None
        self.detail(section, "stop", stopped)
        self.check(f"{tag}: the orchestrator stopped the fleet cleanly (exit 0, no process left to kill)",
                   stopped.get("exit_code") == 0 and not stopped.get("killed_leftovers"), str(stopped))

    def teardown(self) -> None:
        if self.fleet is not None:
            b = SECTION_B in self.report.sections
            try:
                self.stop_fleet(SECTION_B if b else SECTION_A, "B" if b else "A")
            except Exception as exc:  # noqa: BLE001 - the other closers must still run
                self.report.error("teardown", exc)
        for closer in (self.ballast and self.ballast.close, self.standin and self.standin.stop,
                       self.redis and self.redis.close):
            if closer:
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 - teardown goes on whatever one closer raises
                    self.report.error("teardown", exc)
        if self.args.work_dir is None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def summary(report: Report) -> str:
    lines = ["", "=== fleet run ==="]
    for section in ("scenario_a", "scenario_b"):
        data = report.sections.get(section, {})
        placement = data.get("placement", {})
        if placement:
            lines.append(
                f"{section}: placement {placement.get('expected')} (visible {placement.get('visible_devices')})"
            )
        for g in data.get("memory_manager", {}).get("gpus", []):
            lines.append(f"  GPU {g['index']}: ledger total {g['total_gb']} GiB, reserved {g['reserved_gb']}, "
                         f"free {g['free_gb']}, workers {g['workers']}"
                         + (f"; NVML used {g['nvml_used_gib']} of {g['nvml_total_gib']} GiB" if "nvml_used_gib" in g
                            else ""))
        for name in ("alone_sdxl", "alone_wan", "alone_chat", "together"):
            for family, f in data.get(name, {}).get("families", {}).items():
                rate = f.get("images_per_s") or f.get("tokens_per_s") or f.get("frames_per_s")
                lines.append(f"  {name:<11} {family:<5} {f['completed']}/{f['jobs']} done, span {f['span_s']} s, "
                             f"{f['jobs_per_s']} jobs/s, rate {rate}, p50 {f['latency_p50_s']} s")
        for e in data.get("decisions", []):
            lines.append(f"  decision: {e['kind']} {e['worker']} GPU {e['gpu']} {e['gb']} GB: {e['detail']}")
    passed = sum(c.passed for c in report.checks)
    lines.append(f"checks: {passed}/{len(report.checks)} passed; errors: {len(report.errors)}; "
                 f"total {report.meta.get('total_s')} s")
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers", "gunicorn", "redis", "flask"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    path = args.json or (Path(os.environ["OUT"]) / "fleet.json" if os.environ.get("OUT") else None)
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python -m bench fleet " + " ".join(argv if argv is not None else sys.argv[2:]),
            "profile": "tiny" if args.tiny else "full", "python": platform.python_version(),
            "host_cpus": os.cpu_count(), **versions()}
    report = Report(meta, path)
    deadline = Deadline(args.deadline)
    run = FleetRun(args, report, deadline)
    try:
        run.prepare()
        for name, phase in ((SECTION_A, run.scenario_a), (SECTION_B, None if args.skip_b else run.scenario_b)):
            try:
                if phase is run.scenario_b:
                    run.step(SECTION_B, "scenario", 60, phase)
                elif phase is not None:
                    phase()
            except Exception as exc:  # noqa: BLE001 - one scenario's failure must not lose the other
                report.error(name, exc)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - record, then always tear down
        report.error("fleet", exc)
    finally:
        run.teardown()
        report.meta["total_s"] = round(time.monotonic() - started, 1)
        report.save()
    print("\n" + report.table() + summary(report), flush=True)
    return 0 if report.checks and all(c.passed for c in report.checks) and not report.errors else 1

"""Scenario B, "WAN needs room on a full GPU": the memory manager must unload chat on that GPU, and only there.

How the fleet gets there (read from the code): a worker reserves its size from the manager's table before it
loads (``workers/core/service.py``); after ``POST /memory/unload`` it has released its reservation and
reserves again before its next job (``_reload_if_unloaded``). The manager grants a reservation when it fits
``min(total − reserved, probe free) − margin`` on the worker's GPU; otherwise it asks idle workers *on that
GPU* to unload — lower priority ones and ``when_possible`` ones (chat) — never ``always`` ones (SDXL) and
never another GPU's (``memory_manager/policy.py``). Once the on-demand worker (WAN) has been idle for
``MEMORY_RELOAD_QUIET_SECONDS`` and chat fits again, the manager reloads chat.

So: with chat and WAN on GPU g and SDXL on the other GPU, WAN is unloaded; GPU g is filled so that WAN's
reservation does not fit but fits once chat is gone — in full mode by a ballast process holding real GPU
memory (NVML sees it, so does the manager), with ``--tiny`` (capacity probe, no GPU) by a ledger reservation
labelled ``ballast``; then one WAN job is pushed. Checked: the job completes once; the manager unloaded chat
on GPU g for WAN and nothing else; SDXL stayed loaded; WAN was granted after the unload. Then the ballast goes
and chat should come back by the predictive reload.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import fleet_gpu, fleet_jobs
from .fleet_rig import Ballast, Http, Orchestrated

HEADROOM_GIB = 4.0  # WAN's reservation misses by this much before chat goes (chat frees far more)


class RoomScenario:
    def __init__(self, fleet: Orchestrated, http: Http, gpu: int, margin: float, ballast: Ballast | None,
                 check: Callable[[str, bool, str], None], record: Callable[[str, Any], None]):
        self.fleet, self.http, self.gpu, self.margin = fleet, http, gpu, margin
        self.ballast = ballast
        self.check, self.record = check, record
        self.ledger_ballast: str | None = None

    def mm(self, path: str) -> dict[str, Any]:
        code, body = self.http.get(self.fleet.url("memory_manager") + path)
        if code != 200:
            raise RuntimeError(f"memory manager {path}: HTTP {code} {body}")
        return body

    def gpu_row(self) -> dict[str, Any]:
        return next(g for g in self.mm("/memory/status")["gpus"] if g["index"] == self.gpu)

    def make_full(self, wan_gb: float) -> dict[str, Any]:
        """Unload WAN, then fill the GPU until WAN's reservation misses by HEADROOM_GIB."""
        code, body = self.http.post(self.fleet.url("wan") + "/memory/unload", {"which": "all"}, admin=True,
                                    timeout=120)
        self.check("B: WAN unloads on request (it must reserve again for its next job)", code == 200,
                   f"HTTP {code} {body}")
        before = self.gpu_row()
        target_free = wan_gb + self.margin - HEADROOM_GIB
        if self.ballast is not None:
            filled = self.ballast.command(f"fill {target_free:.3f}", timeout=120)
            how = {"ballast_process": filled}
        else:
            reserved_room = before["total_gb"] - before["reserved_gb"] - self.margin
            gb = round(reserved_room - (wan_gb - HEADROOM_GIB), 2)
            code, body = self.http.post(self.fleet.url("memory_manager") + "/reservations",
                                        {"worker": "sdxl", "gpu": self.gpu, "gb": gb, "label": "ballast"},
                                        admin=True)
            if code != 200:
                raise RuntimeError(f"ledger ballast refused: HTTP {code} {body}")
            self.ledger_ballast = body["id"]
            how = {"ledger_ballast": {"gb": gb, "id": body["id"], "worker": "sdxl (label ballast, never evicted)"}}
        after = self.gpu_row()
        self.check(f"B: GPU {self.gpu} is full: WAN's {wan_gb:g} GB do not fit without unloading",
                   after["available_gb"] < wan_gb,
                   f"available {after['available_gb']} GB (free {after['free_gb']}, reserved {after['reserved_gb']}"
                   f" of {after['total_gb']}); chat {'on' if 'chat' in after['workers'] else 'NOT on'} it")
        return {"gpu_before_fill": before, "fill": how, "gpu_after_fill": after, "target_free_gib": target_free}

    def release(self) -> dict[str, Any]:
        if self.ballast is not None:
            return self.ballast.command("release", timeout=60)
        if self.ledger_ballast is not None:
            code, _ = self.http.delete(self.fleet.url("memory_manager") + f"/reservations/{self.ledger_ballast}")
            self.ledger_ballast = None
            return {"ledger_ballast_released": code == 200}
        return {}

    def run(self, client, standin, sizes: fleet_jobs.Sizes, chat_key: str, placement: dict[str, int],
            procs_before: dict, job_timeout: float, reload_wait: float) -> None:
        status = self.mm("/memory/status")
        wan_gb = status["policy"]["wan"]["size_gb"]
        self.record("policy", status["policy"])
        other = sorted({g["index"] for g in status["gpus"]} - {self.gpu})
        mark = time.time()
        smi_before = fleet_gpu.nvidia_smi()
        self.record("worker_gib_before", fleet_gpu.worker_memory(procs_before, smi_before))
        self.record("full", self.make_full(wan_gb))
        outcomes, t0 = fleet_jobs.run_burst(client, standin, self.fleet.url("chat") + "/chat", chat_key,
                                            fleet_jobs.wan_specs(sizes, 1, 0), job_timeout)
        fleet_jobs.recount(standin, outcomes)
        job = outcomes[0]
        self.record("wan_job", {"status": job.status, "latency_s": job.latency_s, "callbacks": job.terminal_callbacks,
                                "generation_time": job.generation_time, "error": job.error})
        self.check("B: the WAN job that needed room completed exactly once",
                   job.status == "completed" and job.terminal_callbacks == 1,
                   f"{job.status} after {job.latency_s} s, {job.terminal_callbacks} terminal callback(s) {job.error}")
        events = [e for e in self.mm("/memory/report")["history"] if e["t"] >= mark]
        self.record("decisions", events)
        unloads = [e for e in events if e["kind"] == "unload"]
        chat_here = [e for e in unloads if e["worker"] == "chat" and e["gpu"] == self.gpu and "wan" in e["detail"]]
        elsewhere = [e for e in unloads if e["gpu"] != self.gpu or e["worker"] != "chat"]
        self.check(f"B: the manager unloaded chat on GPU {self.gpu} for WAN", bool(chat_here),
                   "; ".join(f"{e['kind']} {e['worker']} GPU {e['gpu']}: {e['detail']}" for e in unloads) or
                   "no unload event")
        self.check(f"B: nothing else unloaded (GPU {other} untouched)", not elsewhere,
                   "; ".join(f"{e['worker']} GPU {e['gpu']}" for e in elsewhere) or "only chat on GPU "
                   f"{self.gpu}")
        grants = [e for e in events if e["kind"] == "grant" and e["worker"] == "wan" and e["gpu"] == self.gpu]
        self.check("B: WAN was granted its memory after chat's unload",
                   any("after unloading chat" in e["detail"] for e in grants),
                   "; ".join(e["detail"] for e in grants) or "no grant to WAN")
        self._after(placement, procs_before)
        self._reload(mark, reload_wait)

    def _after(self, placement: dict[str, int], procs: dict) -> None:
        sdxl = self.http.get(self.fleet.url("sdxl") + "/status")[1]
        chat = self.http.get(self.fleet.url("chat") + "/status")[1]
        sdxl_gpu = placement.get("sdxl")
        status = self.mm("/memory/status")
        sdxl_held = sorted({r["gpu"] for r in status["reservations"] if r["worker"] == "sdxl"
                            and r["label"] != "ballast"})
        self.check(f"B: SDXL on GPU {sdxl_gpu} stayed loaded and reserved",
                   bool((sdxl.get("model") or {}).get("loaded")) and sdxl_held == [sdxl_gpu],
                   f"SDXL loaded={(sdxl.get('model') or {}).get('loaded')}, reservations on GPUs {sdxl_held}")
        loaded_chat = (chat.get("model") or {}).get("loaded_models")
        self.record("chat_after", {"loaded_models": loaded_chat, "busy": chat.get("busy")})
        self.record("gpus_after", fleet_gpu.gpu_table(status, fleet_gpu.nvidia_smi()))
        smi = fleet_gpu.nvidia_smi()
        self.record("worker_gib_after", fleet_gpu.worker_memory(procs, smi))

    def _reload(self, mark: float, wait: float) -> None:
        if wait <= 0:
            self.record("reload", "skipped (no time left)")
            return
        self.record("release", self.release())
        deadline = time.monotonic() + wait
        reloads: list = []
        loaded = None
        while time.monotonic() < deadline:
            reloads = [e for e in self.mm("/memory/report")["history"]
                       if e["t"] >= mark and e["kind"] == "reload" and e["worker"] == "chat"]
            loaded = (self.http.get(self.fleet.url("chat") + "/status")[1].get("model") or {}).get("loaded_models")
            if reloads and loaded:
                break
            time.sleep(1.0)
        self.record("reload", {"events": reloads, "chat_loaded_models": loaded})
        self.check("B: chat came back by the predictive reload once the room was free (WAN idle)",
                   bool(reloads and loaded), f"reload events {[e['detail'] for e in reloads]}, chat loaded {loaded}")

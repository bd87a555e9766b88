"""The ops page's JSON document, built from what the collector last heard and its ring buffers.

Every field is picked and typed here (never a source's document passed through), which is what keeps secrets
and user text out of it. Series are ``{"t": [epoch seconds...], "<name>": [values...]}``: one shape for every
chart. The schema is ``OpsData`` in common/openapi.py.
"""
from __future__ import annotations

from typing import Any

Collector = Any   # router.collector.Collector (not imported: the collector imports this module)

SOURCES = ("memory_manager", "gpu_utilization", "orchestrator", "redis", "chat", "pod")
PROGRAM_FIELDS = ("name", "state", "pid", "port", "gpu", "uptime_seconds", "restarts", "health", "last_exit",
                  "last_exit_name")
REASON_CHARS = 200
RECENT_JOBS = 50


def document(c: Collector, now: float) -> dict[str, Any]:
    redis = c.heard.get("redis")
    reading = redis.value if redis is not None else None
    orchestrator = _value(c, "orchestrator") or {}
    return {
        "generated_at": round(now, 3), "interval_seconds": c.interval, "window_seconds": c.window,
        "sources": {name: _source(c, name, now) for name in SOURCES},
        "pod": _pod(c), "gpus": _gpus(c),
        "orchestrator": {"uptime_seconds": orchestrator.get("uptime_seconds"),
                         "stopping": bool(orchestrator.get("stopping", False))},
        "programs": [_program(p) for p in orchestrator.get("programs", []) if isinstance(p, dict)],
        "queues": [{"name": q.name, "waiting": q.waiting, "processing": q.processing, "dead": q.dead}
                   for q in (reading.queues if reading else [])],
        "outbox": reading.outbox if reading else None, "rejected": reading.rejected if reading else None,
        "queue_history": _queue_history(c),
        "jobs": {**c.summary(now), "recent": list(reversed(c.jobs()[-RECENT_JOBS:]))},
        "chat": _chat(c),
    }


def _value(c: Collector, name: str) -> Any:
    heard = c.heard.get(name)
    return heard.value if heard is not None else None


def _source(c: Collector, name: str, now: float) -> dict[str, Any]:
    heard = c.heard.get(name)
    configured = {"memory_manager": c.sources.memory, "gpu_utilization": c.sources.utilization,
                  "orchestrator": c.sources.orchestrator,
                  "redis": c.sources.redis, "chat": c.sources.chat, "pod": c.sources.pod}[name] is not None
    if not configured:
        return {"state": "off", "age_seconds": None}
    if heard is None or (heard.at is None and heard.error is None):
        return {"state": "waiting", "age_seconds": None}
    age = round(now - heard.at, 1) if heard.at is not None else None
    return {"state": "unreachable" if heard.error else "ok", "age_seconds": age}


def _pod(c: Collector) -> dict[str, Any]:
    pod = _value(c, "pod") or {}
    history = list(c.pod_history)
    return {"cpu_percent": pod.get("cpu_percent"), "cpu_count": pod.get("cpu_count"),
            "memory": pod.get("memory"), "disks": pod.get("disks", []),
            "history": {"t": [s[0] for s in history], "cpu_percent": [s[1] for s in history],
                        "memory_percent": [s[2] for s in history]}}


def _gpus(c: Collector) -> list[dict[str, Any]]:
    memory = _value(c, "memory_manager") or {}
    measured = _value(c, "gpu_utilization") or {}
    reservations = [r for r in memory.get("reservations", []) if isinstance(r, dict)]
    out = []
    for gpu in memory.get("gpus", []):
        index = int(gpu.get("index", 0))
        history = list(c.gpu_history.get(index, ()))
        workers = sorted({w for sample in history for w in sample[3]})
        total, free = gpu.get("total_gb"), gpu.get("free_gb")
        utilization = gpu.get("utilization_percent", measured.get(index))
        out.append({
            "index": index, "total_gb": total, "free_gb": free,
            "used_gb": round(total - free, 2) if isinstance(total, (int, float)) and isinstance(free, (int, float))
            else None,
            "reserved_gb": gpu.get("reserved_gb"), "available_gb": gpu.get("available_gb"),
            "pressure": gpu.get("pressure"),
            "utilization_percent": utilization if isinstance(utilization, (int, float)) else None,
            "models": [{"worker": str(r.get("worker")), "label": str(r.get("label", ""))[:64], "gb": r.get("gb")}
                       for r in reservations if r.get("gpu") == index],
            "history": {"t": [s[0] for s in history], "used_gb": [s[1] for s in history],
                        "free_gb": [s[2] for s in history],
                        "reserved_gb": {w: [s[3].get(w, 0.0) for s in history] for w in workers}},
        })
    return out


def _program(p: dict[str, Any]) -> dict[str, Any]:
    reason = p.get("reason")
    return {**{k: p.get(k) for k in PROGRAM_FIELDS},
            "reason": reason[:REASON_CHARS] if isinstance(reason, str) else None}


def _queue_history(c: Collector) -> dict[str, Any]:
    history = list(c.queue_history)
    names = sorted({name for _, waiting in history for name in waiting})
    return {"t": [s[0] for s in history], "waiting": {n: [s[1].get(n, 0) for s in history] for n in names}}


def _chat(c: Collector) -> dict[str, Any]:
    status = _value(c, "chat")
    model = (status.get("model") or {}) if isinstance(status, dict) else {}
    history = list(c.chat_history)
    last = history[-1] if history else (None, None, None, None, None)
    loaded = model.get("loaded_models") if isinstance(model.get("loaded_models"), list) else []
    return {"ready": status.get("ready") if isinstance(status, dict) else None,
            "engine": isinstance(model.get("engine"), dict),
            "loaded_models": [str(m)[:64] for m in loaded],
            "active": last[1], "waiting": last[2], "tokens_per_second": last[3], "ttft_seconds": last[4],
            "history": {"t": [s[0] for s in history], "active": [s[1] for s in history],
                        "tokens_per_second": [s[3] for s in history], "ttft_seconds": [s[4] for s in history]}}

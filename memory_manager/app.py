"""The memory manager's HTTP adapter (``create_app(deps)``): thin routes over :class:`MemoryPolicy`.

    GET    /health, /live          200 while it serves
    GET    /metrics                Prometheus: the pod's GPUs (NVML), CPU, memory, disk; the ledger
    GET    /memory/status          GPUs (total, free, reserved, available, pressure), reservations, policy table
    GET    /memory/report          status + event history (grants, refusals, unloads, reloads, emergencies)
                                   + pressure over time
    POST   /reservations           admin key; {worker, gpu, gb?, priority?, label?, instance?}
                                   → 200 {"success": true, "id", ...} | 409 {"success": false, "reason"}
    DELETE /reservations/<id>      admin key; 200 | 404
    POST   /emergency/operation    admin key; {"operation": status | memory_report | force_unload_all_except
                                   {keep, gpu?} | handle_emergency_request {worker, gb, gpu?} | force_cleanup}

Read-only routes need no key (the manager listens on 127.0.0.1 only); everything that changes state needs
``Authorization: Bearer <WORKER_ADMIN_KEY>``, and with no admin key set it refuses everything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify

from common.http import ApiError, RequestMetrics, create_base_app, json_body, require_admin
from common.settings import Secret

from .policy import MemoryPolicy
from .reservations import InvalidRequest, ReservationRequest

OPERATIONS = ("status", "memory_report", "force_unload_all_except", "handle_emergency_request", "force_cleanup")


@dataclass(frozen=True)
class MemoryDeps:
    policy: MemoryPolicy
    admin_key: Secret | None
    metrics: RequestMetrics | None = None   # GET /metrics (memory_manager/metrics.py)


def create_app(deps: MemoryDeps) -> Flask:
    policy = deps.policy
    app = create_base_app("memory_manager", lambda: (True, {"probe": policy.probe.name}), metrics=deps.metrics,
                          max_body=64 * 1024)
    admin = require_admin(lambda: deps.admin_key)

    @app.get("/memory/status")
    def memory_status():
        return {"success": True, **policy.status()}

    @app.get("/memory/report")
    def memory_report():
        return {"success": True, **policy.report()}

    @app.post("/reservations")
    @admin
    def reserve():
        request = _decode(json_body(), policy)
        decision = policy.reserve(request)
        if not decision.granted:
            return jsonify({"success": False, "reason": decision.reason, "unloaded": list(decision.unloaded)}), 409
        assert decision.reservation is not None
        return {"success": True, **decision.reservation.to_json(), "unloaded": list(decision.unloaded)}

    @app.delete("/reservations/<reservation_id>")
    @admin
    def release(reservation_id: str):
        if policy.release(reservation_id) is None:
            raise ApiError(404, "no such reservation")
        return {"success": True}

    @app.post("/emergency/operation")
    @admin
    def emergency():
        body = json_body()
        operation = body.get("operation")
        if operation not in OPERATIONS:
            raise ApiError(400, "operation must be one of " + ", ".join(OPERATIONS))
        return {"success": True, "operation": operation, **_operate(policy, operation, body)}

    return app


def _decode(body: dict[str, Any], policy: MemoryPolicy) -> ReservationRequest:
    try:
        return ReservationRequest.decode(body, policy.workers, len(policy.probe.gpus()))
    except InvalidRequest as exc:
        raise ApiError(400, str(exc)) from None


def _operate(policy: MemoryPolicy, operation: str, body: dict[str, Any]) -> dict[str, Any]:
    if operation == "status":
        return policy.status()
    if operation == "memory_report":
        return policy.report()
    if operation == "force_cleanup":
        return {"dropped": [r.to_json() for r in policy.cleanup()]}
    gpu = body.get("gpu")
    if gpu is not None and (not isinstance(gpu, int) or isinstance(gpu, bool)
                            or not 0 <= gpu < len(policy.probe.gpus())):
        raise ApiError(400, "gpu must be a valid GPU index")
    if operation == "force_unload_all_except":
        keep = body.get("keep", [])
        keep = [keep] if isinstance(keep, str) else keep
        if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
            raise ApiError(400, "keep must be a worker name or a list of them")
        return policy.unload_all_except(set(keep), gpu)
    request = _decode({**body, "gpu": gpu or 0}, policy)  # handle_emergency_request
    return policy.free_for(request.worker, request.gpu, request.gb)

"""OpenAPI 3.1 documents of the public HTTP surface (CONTRACT §5), built from one route table.

    worker_document(kind)   one worker: the common routes of ``workers.core.service`` plus the kind's own
                            (the chat API and its OpenAI routes for ``chat``, ``POST /enhance`` for ``wan``)
    router_document()       the router on 7860: its own ``/health`` and ``/router/health``, ``/sdxl/*`` and
                            ``/wan/*`` (the workers' routes under a prefix) and the legacy WAN paths
    serve(app, document)    adds ``GET /openapi.json`` (open: the document holds no secret and no path)

The table is the single description of who may call what: ``open`` (no key), ``client`` (Bearer
``WAN_WORKER_API_KEY`` or ``CHAT_WORKER_API_KEY``; no header at all only with ``ALLOW_ANONYMOUS_API``) and
``admin`` (Bearer ``WORKER_ADMIN_KEY``; refused when it is unset). ``tests/security`` checks every app's
routes against it, so a route added without an entry here fails CI.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OPENAPI_VERSION = "3.1.0"
AUTH_KINDS = ("open", "client", "admin")
MAX_TOKENS = 4096  # workers.chat.sampling.MAX_NEW_TOKENS (not imported: this module stays torch-free)


@dataclass(frozen=True)
class Op:
    """One operation: ``body``/``ok`` name schemas in ``SCHEMAS``; ``errors`` are the documented statuses."""

    method: str
    path: str
    summary: str
    auth: str = "open"
    body: str | None = None
    ok: str = "Object"
    ok_media: str = "application/json"
    errors: tuple[int, ...] = ()
    query: tuple[str, ...] = ()
    tag: str = "worker"
    basic: bool = False     # the admin key is also taken as HTTP Basic's password (the ops page: browsers)

    def prefixed(self, prefix: str, tag: str) -> Op:
        return Op(self.method, prefix + self.path, self.summary, self.auth, self.body, self.ok, self.ok_media,
                  self.errors + (502, 504), self.query, tag)


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_REF = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
_SAMPLING = {
    "max_tokens": {**_INT, "minimum": 1, "maximum": MAX_TOKENS},
    "temperature": {**_NUM, "minimum": 0, "maximum": 2, "description": "0 means greedy"},
    "top_p": {**_NUM, "minimum": 0, "maximum": 1},
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "seed": _INT,
    "model": {"type": "string", "enum": ["qwen_instruct", "qwen_base"]},
    "sfw_mode": _BOOL,
}

_N = lambda kind: {"type": [kind, "null"]}  # noqa: E731
_SERIES = {"type": "object", "description": "a time series: t (epoch seconds) and one array per value name",
           "properties": {"t": {"type": "array", "items": _NUM}}, "required": ["t"]}
_OUTCOME = {"enum": ["completed", "failed", "invalid", "dead", "cancelled"]}
OPS_SCHEMAS: dict[str, dict[str, Any]] = {
    "OpsData": _obj({
        "generated_at": _NUM, "interval_seconds": _NUM, "window_seconds": _NUM,
        "sources": {"type": "object", "additionalProperties": _obj(
            {"state": {"enum": ["ok", "unreachable", "waiting", "off"]}, "age_seconds": _N("number")},
            ("state", "age_seconds"))},
        "pod": _obj({"cpu_percent": _N("number"), "cpu_count": _N("integer"), "memory": _N("object"),
                     "disks": {"type": "array", "items": _obj({"label": _STR, "total_bytes": _INT,
                                                               "used_bytes": _INT, "percent": _NUM})},
                     "history": _SERIES}),
        "gpus": {"type": "array", "items": _REF("OpsGpu")},
        "orchestrator": _obj({"uptime_seconds": _N("number"), "stopping": _BOOL}),
        "programs": {"type": "array", "items": _obj({
            "name": _STR, "state": _STR, "pid": _N("integer"), "port": _N("integer"), "gpu": _N("string"),
            "uptime_seconds": _N("number"), "restarts": _N("integer"), "health": _N("string"),
            "last_exit": _N("integer"), "last_exit_name": _N("string"), "reason": _N("string")}, ("name", "state"))},
        "queues": {"type": "array", "items": _obj({"name": _STR, "waiting": _INT, "processing": _INT, "dead": _INT},
                                                  ("name", "waiting", "processing", "dead"))},
        "outbox": _N("integer"), "rejected": _N("integer"), "queue_history": _SERIES,
        "jobs": _obj({"bucket_seconds": _NUM, "types": {"type": "array", "items": _REF("OpsJobType")},
                      "recent": {"type": "array", "maxItems": 50, "items": _REF("OpsJob")}},
                     ("bucket_seconds", "types", "recent")),
        "chat": _obj({"ready": _N("boolean"), "engine": _BOOL, "loaded_models": {"type": "array", "items": _STR},
                      "active": _N("integer"), "waiting": _N("integer"), "tokens_per_second": _N("number"),
                      "ttft_seconds": _N("number"), "history": _SERIES}),
    }, ("generated_at", "interval_seconds", "sources", "pod", "gpus", "programs", "queues", "jobs", "chat")),
    "OpsGpu": _obj({
        "index": _INT, "total_gb": _N("number"), "free_gb": _N("number"), "used_gb": _N("number"),
        "reserved_gb": _N("number"), "available_gb": _N("number"), "pressure": _N("string"),
        "utilization_percent": _N("number"),
        "models": {"type": "array", "items": _obj({"worker": _STR, "label": _STR, "gb": _N("number")})},
        "history": _SERIES}, ("index", "models", "history")),
    "OpsJobType": _obj({
        "type": _STR, "count": _INT, "completed": _INT, "failed": _INT, "p50_seconds": _N("number"),
        "p95_seconds": _N("number"), "per_minute": {"type": "array", "items": _obj({
            "t": _NUM, "completed": _INT, "failed": _INT, "p50_seconds": _N("number"),
            "p95_seconds": _N("number")})}}, ("type", "count", "failed", "per_minute")),
    "OpsJob": _obj({"id": {**_STR, "maxLength": 8}, "type": _STR, "outcome": _OUTCOME, "seconds": _N("number"),
                    "worker": _STR, "attempt": _N("integer"), "error_type": _N("string"), "t": _NUM},
                   ("id", "type", "outcome", "t"), description="one finished job; never its prompt or any user text"),
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Object": {"type": "object"},
    "Error": _obj({"success": {"const": False}, "error": _STR}, ("success", "error")),
    "OpenAIError": _obj({"error": _obj({"message": _STR, "type": _STR})}, ("error",)),
    "Health": _obj({"status": {"enum": ["healthy", "unavailable"]}, "service": _STR}, ("status",)),
    "Live": _obj({"status": {"enum": ["alive", "dead"]}, "service": _STR, "error": _STR}, ("status",)),
    "Control": _obj({"success": _BOOL, "message": _STR}, ("success",)),
    "Which": _obj({"which": {"type": "string", "description": "all, or a model name of this worker "
                                                            "(chat: instruct, base)"}}),
    "Message": _obj({"role": {"enum": ["system", "user", "assistant"]}, "content": _STR}, ("role", "content")),
    "ChatRequest": _obj({"messages": {"type": "array", "items": _REF("Message"), "minItems": 1, "maxItems": 256},
                         **_SAMPLING}, ("messages",),
                        description="Unknown keys (conversation_id, project_context, ...) are ignored."),
    "EnhanceRequest": _obj({"messages": {"type": "array", "items": _REF("Message"), "minItems": 1,
                                         "maxItems": 256},
                            "prompt": {**_STR, "minLength": 1}, **_SAMPLING},
                           description="messages, or a bare prompt; max_tokens defaults to 200."),
    "GenerateRequest": {"oneOf": [_REF("ChatRequest"), _obj({
        "inputs": {**_STR, "minLength": 1},
        "parameters": _obj({"max_new_tokens": {**_INT, "minimum": 1, "maximum": MAX_TOKENS},
                            "temperature": _SAMPLING["temperature"], "top_p": _SAMPLING["top_p"],
                            "do_sample": _BOOL, "return_full_text": _BOOL}),
        "model": _SAMPLING["model"]}, ("inputs",))]},
    "OpenAIChatRequest": _obj({
        "model": _SAMPLING["model"], "stream": _BOOL, "n": {"const": 1},
        "messages": {"type": "array", "minItems": 1, "maxItems": 256, "items": _obj(
            {"role": {"enum": ["system", "developer", "user", "assistant"]}, "content": _STR}, ("role", "content"))},
        "max_completion_tokens": _SAMPLING["max_tokens"],
        **{k: v for k, v in _SAMPLING.items() if k not in ("model",)}}, ("messages",)),
    "WanEnhanceRequest": _obj({"prompt": {**_STR, "minLength": 1, "maxLength": 2000},
                               "model": {"enum": ["qwen_base", "qwen_instruct"]}}, ("prompt",)),
    "ChatResponse": _obj({"success": {"const": True}, "response": _STR, "generation_time": _NUM,
                          "tokens_generated": _INT, "model_info": {"type": "object"},
                          "generated_text": _STR}, ("success", "response")),
    "EnhanceResponse": _obj({"success": {"const": True}, "enhanced_prompt": _STR, "original_prompt": _STR,
                             "enhancement_source": _STR, "generation_time": _NUM, "processing_time": _NUM},
                            ("success", "enhanced_prompt")),
    "ChatCompletion": _obj({"id": _STR, "object": _STR, "choices": {"type": "array"}, "usage": {"type": "object"}}),
    **OPS_SCHEMAS,
}

ADMIN_ERRORS = (400, 401, 409, 503)
OPS: tuple[Op, ...] = (
    Op("GET", "/ops", "the ops page (HTML, refreshes itself from /ops/data)", "admin", ok_media="text/html",
       errors=(401,), tag="ops", basic=True),
    Op("GET", "/ops/data", "the ops page's data: GPUs, programs, queues, jobs, chat, pod; the last hour's history",
       "admin", ok="OpsData", errors=(401,), tag="ops", basic=True),
)
COMMON: tuple[Op, ...] = (
    Op("GET", "/health", "readiness: 200 once the worker can take work, 503 while loading or broken", ok="Health",
       errors=(503,)),
    Op("GET", "/live", "liveness: 200 while the process and its job loop run (loading and busy included), 503 "
       "when the job loop died; the orchestrator restarts on this one only", ok="Live", errors=(503,)),
    Op("GET", "/metrics", "Prometheus metrics", ok_media="text/plain"),
    Op("GET", "/status", "state, current job progress, loaded model (no secrets, no paths)"),
    Op("GET", "/memory/status", "device memory and loaded models"),
    Op("POST", "/memory/load", "load models (409 while a job runs)", "admin", "Which", "Control",
       errors=ADMIN_ERRORS, query=("which",)),
    Op("POST", "/memory/unload", "unload models (409 while a job runs)", "admin", "Which", "Control",
       errors=ADMIN_ERRORS, query=("which",)),
    Op("GET", "/debug/env", "versions, device, which settings are set (names and true/false only)", "admin",
       errors=(401,)),
    Op("GET", "/openapi.json", "this document"),
)
CLIENT_ERRORS = (400, 401, 413, 503, 504)
CHAT: tuple[Op, ...] = (
    Op("POST", "/chat", "chat with a Qwen model", "client", "ChatRequest", "ChatResponse", errors=CLIENT_ERRORS),
    Op("POST", "/chat/unrestricted", "chat without the sfw filter", "client", "ChatRequest", "ChatResponse",
       errors=CLIENT_ERRORS),
    Op("POST", "/enhance", "rewrite a prompt", "client", "EnhanceRequest", "EnhanceResponse", errors=CLIENT_ERRORS),
    Op("POST", "/generate", "the /chat body, or {inputs, parameters} (raw text)", "client", "GenerateRequest",
       "ChatResponse", errors=CLIENT_ERRORS),
    Op("GET", "/enhancement/info", "what /enhance does: models, defaults, fields", "client", errors=(401,)),
    Op("GET", "/worker/info", "loaded models, capabilities, endpoints", "client", errors=(401,)),
    Op("GET", "/debug/model", "model details (no paths)", "client", errors=(401,)),
    Op("POST", "/v1/chat/completions", "OpenAI-compatible chat (stream: true for server-sent events)", "client",
       "OpenAIChatRequest", "ChatCompletion", errors=CLIENT_ERRORS),
    Op("GET", "/v1/models", "OpenAI-compatible model list", "client", errors=(401,)),
)
WAN: tuple[Op, ...] = (
    Op("POST", "/enhance", "rewrite a prompt with Qwen base (through the chat worker)", "client",
       "WanEnhanceRequest", "EnhanceResponse", errors=(400, 401, 413, 502, 503)),
)
KIND_ROUTES = {"chat": CHAT, "wan": WAN, "sdxl": ()}
ROUTER_OWN: tuple[Op, ...] = (
    Op("GET", "/health", "200 while either worker serves; shows each", ok="Health", errors=(503,), tag="router"),
    Op("GET", "/router/health", "200 while the router process serves", ok="Health", tag="router"),
    Op("GET", "/live", "liveness: 200 while the router process serves", ok="Live", tag="router"),
    Op("GET", "/openapi.json", "this document", tag="router"),
) + OPS
LEGACY_WAN_PATHS = ("/enhance", "/memory/status", "/memory/load", "/memory/unload", "/debug/env")


def worker_ops(kind: str) -> tuple[Op, ...]:
    return COMMON + KIND_ROUTES.get(kind, ())


def router_ops() -> tuple[Op, ...]:
    wan = worker_ops("wan")
    legacy = tuple(Op(o.method, o.path, f"legacy: same as /wan{o.path}", o.auth, o.body, o.ok, o.ok_media,
                      o.errors + (502, 504), o.query, "legacy")
                   for o in wan if o.path in LEGACY_WAN_PATHS)
    return (ROUTER_OWN + tuple(o.prefixed("/sdxl", "sdxl") for o in worker_ops("sdxl"))
            + tuple(o.prefixed("/wan", "wan") for o in wan) + legacy)


def worker_document(kind: str) -> dict[str, Any]:
    title = {"chat": "Chat worker (port 7861)", "wan": "WAN worker", "sdxl": "SDXL worker"}.get(kind, f"{kind} worker")
    return document(title, worker_ops(kind))


def router_document() -> dict[str, Any]:
    return document("Router (port 7860): SDXL and WAN workers", router_ops())


def document(title: str, ops: tuple[Op, ...]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    used = {"Error", "OpenAIError"}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
        used.update(name for name in (op.body, op.ok) if name)
    schemas = {name: SCHEMAS[name] for name in SCHEMAS if name in _closure(used)}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": "1",
                 "description": "Client routes take Authorization: Bearer <WAN_WORKER_API_KEY or "
                                "CHAT_WORKER_API_KEY>; control routes Bearer <WORKER_ADMIN_KEY>. "
                                "Errors are JSON, never a stack trace."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "clientKey": {"type": "http", "scheme": "bearer",
                          "description": "WAN_WORKER_API_KEY or CHAT_WORKER_API_KEY"},
            "adminKey": {"type": "http", "scheme": "bearer", "description": "WORKER_ADMIN_KEY"},
            "adminBasic": {"type": "http", "scheme": "basic",
                           "description": "any user name, WORKER_ADMIN_KEY as the password (what a browser sends)"}}},
    }


def _operation(op: Op) -> dict[str, Any]:
    openai = op.path.endswith(("/v1/chat/completions", "/v1/models"))
    # OpenAI routes answer bad input in OpenAI's shape; auth and size errors come first, in ours
    error = {"anyOf": [_REF("OpenAIError"), _REF("Error")]} if openai else _REF("Error")
    content = {"application/json": {"schema": _REF(op.ok)}} if op.ok_media == "application/json" else {
        op.ok_media: {"schema": _STR}}
    if op.path.endswith("/v1/chat/completions"):
        content["text/event-stream"] = {"schema": _STR}
    responses: dict[str, Any] = {"200": {"description": "success", "content": content}}
    for status in sorted(set(op.errors) | ({401} if op.auth != "open" else set())):
        responses[str(status)] = {"description": _REASONS.get(status, "error"),
                                  "content": {"application/json": {"schema": error}}}
    operation: dict[str, Any] = {"summary": op.summary, "operationId": _operation_id(op), "tags": [op.tag],
                                 "x-auth": op.auth, "responses": responses}
    if op.auth != "open":
        operation["security"] = [{"clientKey" if op.auth == "client" else "adminKey": []}]
        if op.basic:
            operation["security"].append({"adminBasic": []})
    if op.body:
        operation["requestBody"] = {"required": op.method == "POST" and op.body != "Which",
                                    "content": {"application/json": {"schema": _REF(op.body)}}}
    if op.query:
        operation["parameters"] = [{"name": q, "in": "query", "required": False, "schema": _STR} for q in op.query]
    return operation


_REASONS = {400: "bad input (the message names the field)", 401: "missing or invalid key", 409: "busy",
            413: "request body too large", 502: "backend unreachable",
            503: "no model can serve, loading, or at capacity (Retry-After says when to retry)", 504: "timed out"}


def _operation_id(op: Op) -> str:
    words = op.path.strip("/").replace(".", "_").replace("-", "_").split("/")
    return op.method.lower() + "_" + "_".join(w for w in words if w) if words != [""] else op.method.lower()


def _closure(names: set[str]) -> set[str]:
    """Schema names reachable from ``names`` through ``$ref``."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in SCHEMAS:
            continue
        seen.add(name)
        todo.extend(_refs(SCHEMAS[name]))
    return seen


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].rsplit("/", 1)[1]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def serve(app: Any, document_fn: Callable[[], dict[str, Any]]) -> None:
    """``GET /openapi.json`` on a Flask app (built once, on first request)."""
    cache: dict[str, Any] = {}

    def openapi_json():
        from flask import jsonify
        if "doc" not in cache:
            cache["doc"] = document_fn()
        return jsonify(cache["doc"])

    app.add_url_rule("/openapi.json", "openapi_json", openapi_json, methods=["GET"])

"""The chat worker's HTTP routes (CONTRACT §5), declared as a Blueprint on the chat handler's ``ChatService``;
the worker service mounts it (``create_routes``).

Routes parse the body, call one ``ChatService`` method and shape the answer. Client routes need a Bearer key
(``WAN_WORKER_API_KEY`` or ``CHAT_WORKER_API_KEY``; no header at all only with ``ALLOW_ANONYMOUS_API``).
Generating routes first reload an evicted model (the worker's ``Residency``), then wait with the HTTP patience:
the server-side deadline, the client's disconnect check (client.py), shed when the waiting line is full.
Errors: 400 bad input (naming the field), 401 bad key, 503 no model can serve or at capacity (with
Retry-After when retrying helps), 504 timeout, 499 the client went away; never a trace.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Blueprint, g, jsonify
from flask import request as http_request

from common.http import ApiError, json_body, require_key
from common.settings import Settings
from workers.core.errors import InvalidJob, WorkerError
from workers.core.residency import Residency

from .client import ClientGone, disconnect_check
from .handler import ChatHandler
from .openai import add_openai_routes
from .request import DEFAULT_MAX_TOKENS, ENHANCE_MAX_TOKENS, Fields, chat_request, generate_request
from .sampling import MAX_NEW_TOKENS
from .service import Patience, Reply
from .statuses import CLIENT_GONE, retry_after, status_of

REQUEST_FIELDS = ["messages", "prompt", "max_tokens", "temperature", "top_p", "presence_penalty",
                  "frequency_penalty", "seed", "model", "sfw_mode"]


def client_auth(settings: Settings) -> Callable:
    return require_key(lambda: (settings.wan_worker_api_key, settings.chat_worker_api_key),
                       lambda: settings.allow_anonymous)


def api_errors(view: Callable) -> Callable:
    """Map typed worker errors to client statuses (400 / 503 / 504 / 500 / 499) with their safe messages."""
    @wraps(view)
    def wrapper(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except ClientGone as exc:
            raise ApiError(CLIENT_GONE, str(exc)) from None
        except InvalidJob as exc:
            raise ApiError(400, exc.message) from None
        except WorkerError as exc:
            status = status_of(exc)
            return jsonify({"success": False, "error": exc.message}), status, retry_after(exc, status)
    return wrapper


def http_patience(handler: ChatHandler) -> Patience:
    """This request's: the deadline, a disconnect check on its socket, shed when the line is full."""
    arrived = g.get("chat_arrived")
    elapsed = time.monotonic() - arrived if arrived is not None else 0.0
    return handler.chat.http_patience(disconnect_check(http_request.environ), elapsed)


def reply_body(reply: Reply, **extra: Any) -> dict[str, Any]:
    return {"success": True, "response": reply.text, "generation_time": round(reply.seconds, 3),
            "tokens_generated": len(reply.generation.token_ids), "model_info": {**reply.model_info(), **extra}}


def create_routes(handler: ChatHandler, residency: Residency) -> Blueprint:
    """The chat routes on ``handler``'s service; ``residency`` reloads an evicted model before a generation and
    lends its memory client to the lazy ``qwen_base`` load (one client per worker: the manager knows it)."""
    handler.lazy.memory = residency.memory
    routes = Blueprint("chat", __name__)
    auth = client_auth(handler.settings)

    def reload() -> None:
        """Before a generation: the request's deadline starts now, and the reload's wait for the GPU is part of
        it (so a request that first reloads still answers within CHAT_REQUEST_TIMEOUT_SECONDS + the load)."""
        g.chat_arrived = time.monotonic()
        settings = handler.settings
        residency.reload_for_request(handler.default_models(),
                                     min(settings.chat_reload_wait_seconds, settings.chat_request_timeout_seconds))

    def route(rule: str, methods: list[str], generates: bool = False):
        def decorate(view: Callable) -> Callable:
            @wraps(view)
            def generating(*args, **kwargs):
                reload()
                return view(*args, **kwargs)
            inner = generating if generates else view
            return routes.route(rule, methods=methods, endpoint=view.__name__)(auth(api_errors(inner)))
        return decorate

    @route("/chat", ["POST"], generates=True)
    def chat():
        return jsonify(reply_body(handler.chat.reply(chat_request(Fields(json_body())), http_patience(handler))))

    @route("/chat/unrestricted", ["POST"], generates=True)
    def chat_unrestricted():
        reply = handler.chat.reply(chat_request(Fields(json_body())), http_patience(handler), unrestricted=True)
        return jsonify(reply_body(reply, unrestricted_mode=True))

    @route("/enhance", ["POST"], generates=True)
    def enhance():
        enhancement = handler.chat.enhance(Fields(json_body()), http_patience(handler))
        body = reply_body(enhancement.reply, enhancement_empty=not enhancement.rewrite)
        body.pop("response")
        return jsonify({"success": True, **enhancement.fields(), **body})

    @route("/generate", ["POST"], generates=True)
    def generate():
        request = generate_request(json_body())
        reply = handler.chat.reply(request, http_patience(handler))
        body = reply_body(reply)
        if request.text is not None:
            body["generated_text"] = (request.text + reply.text) if request.return_full_text else reply.text
        return jsonify(body)

    @route("/enhancement/info", ["GET"])
    def enhancement_info():
        return jsonify({
            "success": True, "endpoint": "POST /enhance",
            "description": "Rewrites a prompt with a Qwen model under a configured system instruction "
                           "(used when the request has no system message of its own).",
            "models": handler.models_available(), "default_model": "qwen_instruct",
            "defaults": {"max_tokens": ENHANCE_MAX_TOKENS, "temperature": 0.7, "top_p": 0.9},
            "limits": {"max_tokens": MAX_NEW_TOKENS, "temperature": [0, 2], "top_p": [0, 1],
                       "presence_penalty": [-2, 2], "frequency_penalty": [-2, 2]},
            "request_fields": REQUEST_FIELDS,
            "response_fields": ["success", "enhanced_prompt", "original_prompt", "enhancement_source",
                                "generation_time", "tokens_generated", "model_info"],
            "custom_instruction": handler.settings.chat_enhance_template_path is not None})

    @route("/worker/info", ["GET"])
    def worker_info():
        return jsonify({"success": True, **handler.status(),
                        "defaults": {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.7, "top_p": 0.9}})

    @route("/debug/model", ["GET"])
    def debug_model():
        return jsonify({"success": True, **handler.status(detail=True)})

    add_openai_routes(routes, handler, auth, reload, lambda: http_patience(handler))
    return routes

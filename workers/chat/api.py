"""The chat worker's HTTP routes (CONTRACT §5), added to the service's Flask app.

Routes parse the body, call one ``ChatService`` method and shape the answer. Client routes need a Bearer key
(``WAN_WORKER_API_KEY`` or ``CHAT_WORKER_API_KEY``; no header at all only with ``ALLOW_ANONYMOUS_API``).
Errors: 400 bad input (naming the field), 401 bad key, 503 no model can serve, 504 timeout; never a trace.
"""
from __future__ import annotations

from functools import wraps
from typing import TYPE_CHECKING, Any, Callable

from flask import jsonify

from workers.core.errors import ErrorType, InvalidJob, WorkerError
from workers.core.http import ApiError, json_body, require_key

from .openai import register_openai_routes
from .request import (DEFAULT_MAX_TOKENS, ENHANCE_MAX_TOKENS, Fields, chat_request, enhance_request,
                      generate_request)
from .sampling import MAX_NEW_TOKENS
from .service import Reply

if TYPE_CHECKING:
    from .handler import ChatHandler

REQUEST_FIELDS = ["messages", "prompt", "max_tokens", "temperature", "top_p", "presence_penalty",
                  "frequency_penalty", "seed", "model", "sfw_mode"]


def client_auth(service: Any) -> Callable:
    settings = service.settings
    return require_key(lambda: (settings.wan_worker_api_key, settings.chat_worker_api_key),
                       lambda: settings.allow_anonymous)


def api_errors(view: Callable) -> Callable:
    """Map typed worker errors to client statuses (400 / 503 / 504 / 500) with their safe messages."""
    @wraps(view)
    def wrapper(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except InvalidJob as exc:
            raise ApiError(400, exc.message) from None
        except WorkerError as exc:
            raise ApiError(status_of(exc), exc.message) from None
    return wrapper


def status_of(exc: WorkerError) -> int:
    if exc.error_type is ErrorType.TIMEOUT_ERROR:
        return 504
    if exc.error_type in (ErrorType.WORKER_UNAVAILABLE, ErrorType.MODEL_LOAD_ERROR, ErrorType.OOM_ERROR):
        return 503
    return 500


def reply_body(reply: Reply, **extra: Any) -> dict[str, Any]:
    return {"success": True, "response": reply.text, "generation_time": round(reply.seconds, 3),
            "tokens_generated": len(reply.generation.token_ids), "model_info": {**reply.model_info(), **extra}}


def register_routes(app: Any, service: Any) -> None:
    handler: "ChatHandler" = service.handler
    auth = client_auth(service)

    def route(rule: str, methods: list[str]):
        def decorate(view: Callable) -> Callable:
            return app.route(rule, methods=methods, endpoint=f"chat_{view.__name__}")(auth(api_errors(view)))
        return decorate

    @route("/chat", ["POST"])
    def chat():
        return jsonify(reply_body(handler.chat.reply(chat_request(Fields(json_body())))))

    @route("/chat/unrestricted", ["POST"])
    def chat_unrestricted():
        reply = handler.chat.reply(chat_request(Fields(json_body())), unrestricted=True)
        return jsonify(reply_body(reply, unrestricted_mode=True))

    @route("/enhance", ["POST"])
    def enhance():
        request, original = enhance_request(Fields(json_body()), handler.chat.instruction)
        reply = handler.chat.reply(request)
        enhanced = enhanced_text(reply.text)
        body = reply_body(reply, enhancement_empty=not enhanced)
        body.pop("response")
        return jsonify({"success": True, "enhanced_prompt": enhanced or original, "original_prompt": original,
                        "enhancement_source": reply.loaded.name.value, **body})

    @route("/generate", ["POST"])
    def generate():
        request = generate_request(json_body())
        reply = handler.chat.reply(request)
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

    register_openai_routes(app, handler, auth, status_of)


def enhanced_text(text: str) -> str:
    """The model's rewrite without surrounding quotes or a leading label."""
    text = text.strip()
    for label in ("Enhanced prompt:", "Prompt:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text

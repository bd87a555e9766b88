"""OpenAI-compatible routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``)
and ``GET /v1/models``. Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from common.http import ApiError, json_body
from workers.core.errors import InvalidJob, WorkerError

from .client import ClientGone
from .handler import ChatHandler
from .models import ModelName
from .request import openai_request
from .service import Patience, Reply
from .statuses import CLIENT_GONE, retry_after, status_of

log = logging.getLogger(__name__)


def add_openai_routes(routes: Blueprint, handler: ChatHandler, auth: Callable, reload: Callable[[], None],
                      patience: Callable[[], Patience]) -> None:
    """Onto the chat Blueprint (api.py): ``reload`` brings an evicted model back; ``patience`` is this
    request's way of waiting."""
    @routes.post("/v1/chat/completions", endpoint="openai_completions")
    @auth
    def completions():
        try:
            request, stream = openai_request(json_body())
            reload()
            if stream:
                events = handler.chat.stream(request, patience().check)
                return Response(_sse(events, _completion_id(), request.model.value), mimetype="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            reply = handler.chat.reply(request, patience())
        except ApiError as exc:
            return _error(exc.status, exc.message)
        except ClientGone as exc:
            return _error(CLIENT_GONE, str(exc))
        except InvalidJob as exc:
            return _error(400, exc.message)
        except WorkerError as exc:
            status = status_of(exc)
            return (*_error(status, exc.message, "server_error"), retry_after(exc, status))
        return jsonify(_completion(reply))

    @routes.get("/v1/models", endpoint="openai_models")
    @auth
    def models():
        available = handler.models_available()
        return jsonify({"object": "list", "data": [
            {"id": name.value, "object": "model", "created": 0, "owned_by": "local",
             "loaded": available[name.value]["loaded"]} for name in ModelName if available[name.value]["configured"]]})


def _completion(reply: Reply) -> dict[str, Any]:
    completion = len(reply.generation.token_ids)
    return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": reply.loaded.name.value,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.generation.finish_reason}],
            "usage": {"prompt_tokens": reply.generation.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": reply.generation.prompt_tokens + completion}}


def _sse(events: Iterator[str | Reply], completion_id: str, model: str) -> Iterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for event in events:
            if isinstance(event, Reply):
                model = event.loaded.name.value
                tokens = len(event.generation.token_ids)
                yield chunk({}, event.generation.finish_reason, usage={
                    "prompt_tokens": event.generation.prompt_tokens, "completion_tokens": tokens,
                    "total_tokens": event.generation.prompt_tokens + tokens})
            elif event:
                yield chunk({"content": event})
    except ClientGone:  # nobody left to tell; the generation was cancelled on the way out (ChatService.stream)
        log.info("stream ended early: the client closed the connection")
        return
    except WorkerError as exc:  # headers are sent: report in-band, as OpenAI does
        log.warning("stream ended early: %s", exc.message)
        error = {"message": exc.message, "type": "server_error", "code": exc.error_type.value}
        yield f"data: {json.dumps({'error': error})}\n\n"
    yield "data: [DONE]\n\n"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> tuple[Response, int]:
    return jsonify({"error": {"message": message, "type": kind, "param": None, "code": None}}), status

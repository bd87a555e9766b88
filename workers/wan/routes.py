"""WAN's own HTTP route (CONTRACT §5): ``POST /enhance`` — prompt rewriting through the chat worker. Declared
as a Blueprint on the handler's enhancer (``create_routes``); the worker service mounts it.

Bearer ``WAN_WORKER_API_KEY`` or ``CHAT_WORKER_API_KEY``; no header passes only with ``ALLOW_ANONYMOUS_API``.
401 without a valid key, 400 on an empty or too long prompt or an unknown model, 503 when the chat worker
cannot be reached in time, 502 when it answers with something unusable.
"""
from __future__ import annotations

import time

from flask import Blueprint, jsonify

from common.http import ApiError, json_body, require_key
from common.settings import Settings
from workers.core.residency import Residency

from .enhance import DEFAULT_MODEL, MODELS, EnhanceError, PromptEnhancer
from .handler import WanHandler


def create_routes(handler: WanHandler, residency: Residency | None = None) -> Blueprint:
    """WAN's route on ``handler``'s enhancer; it needs nothing of the worker's residency (it loads no model)."""
    return enhance_routes(handler.settings, handler.enhancer)


def enhance_routes(settings: Settings, enhancer: PromptEnhancer) -> Blueprint:
    routes = Blueprint("wan", __name__)
    keyed = require_key(lambda: (settings.wan_worker_api_key, settings.chat_worker_api_key),
                        lambda: settings.allow_anonymous)

    @routes.post("/enhance")
    @keyed
    def enhance():
        prompt, model = _parse(json_body(), settings.max_prompt_chars)
        started = time.monotonic()
        try:
            text = enhancer.enhance(prompt, model)
        except EnhanceError as exc:
            raise ApiError(exc.status, f"prompt enhancement unavailable: {exc.message}") from None
        return jsonify({"success": True, "enhanced_prompt": text, "original_prompt": prompt,
                        "enhancement_source": model,
                        "processing_time": round(time.monotonic() - started, 3)})

    return routes


def _parse(body: dict, max_chars: int) -> tuple[str, str]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "'prompt' is required (a non-empty string)")
    if len(prompt) > max_chars:
        raise ApiError(400, f"'prompt' is longer than {max_chars} characters")
    model = body.get("model") or DEFAULT_MODEL
    if model not in MODELS:
        raise ApiError(400, f"'model' must be one of {', '.join(MODELS)}")
    return prompt.strip(), model

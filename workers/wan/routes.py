"""WAN's own HTTP route (CONTRACT §5): ``POST /enhance`` — prompt rewriting through the chat worker.

Bearer ``WAN_WORKER_API_KEY`` or ``CHAT_WORKER_API_KEY``; no header passes only with ``ALLOW_ANONYMOUS_API``.
401 without a valid key, 400 on an empty or too long prompt or an unknown model, 503 when the chat worker
cannot be reached in time, 502 when it answers with something unusable.
"""
from __future__ import annotations

import time

from flask import Flask, jsonify

from common.http import ApiError, json_body, require_key
from common.settings import Settings

from .enhance import DEFAULT_MODEL, MODELS, EnhanceError, PromptEnhancer


def register(app: Flask, settings: Settings, enhancer: PromptEnhancer) -> None:
    keyed = require_key(lambda: (settings.wan_worker_api_key, settings.chat_worker_api_key),
                        lambda: settings.allow_anonymous)

    @app.post("/enhance")
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

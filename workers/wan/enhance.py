"""Prompt enhancement through the chat worker's ``POST /enhance`` (CONTRACT §2.2, §5): no Qwen in the WAN
process, so only one copy of the Qwen base model is ever resident.

The rewrite instruction is configuration: the template file ``WAN_ENHANCE_TEMPLATE`` (default: the neutral
``enhance_template.txt`` next to this module), read on every call so an operator can replace it without a
restart, or a job's ``metadata.enhance_instruction``. Without a ``{prompt}`` placeholder the instruction is
the system message and the prompt the user message; with one, the filled-in template is the single user
message.

``WAN_ENHANCE_TIMEOUT_SECONDS`` (default 20) bounds the whole exchange, retries included: the request runs
in a helper thread and the caller stops waiting at the deadline (the socket times out at the same deadline,
so an abandoned request ends too). A job whose enhancement fails keeps its original prompt and says so.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from common import logs
from common.http import pooled_session
from common.settings import Secret, Settings

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).with_name("enhance_template.txt")
MODELS = ("qwen_base", "qwen_instruct")
DEFAULT_MODEL = "qwen_base"
MAX_TOKENS = 200
TRIES = 3


class EnhanceError(Exception):
    """Enhancement failed; ``status`` is the HTTP status for ``/enhance`` (503 unreachable, 502 bad answer)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Enhancement:
    prompt: str                # the prompt to generate with
    applied: bool
    source: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def metadata(self, original: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"enhancement_applied": self.applied, "enhancement_time": round(self.seconds, 3)}
        if self.applied:
            meta.update(enhanced_prompt=self.prompt, enhancement_source=self.source, original_prompt=original)
        else:
            meta["enhancement_error"] = self.error
        return meta


class PromptEnhancer:
    def __init__(self, base_url: str, api_key: Secret | None, template: Path | None = None,
                 timeout: float = 20.0, max_chars: int = 2000, session: requests.Session | None = None):
        self.url = base_url.rstrip("/") + "/enhance"
        self._key = api_key
        self.template = template or DEFAULT_TEMPLATE
        self.timeout = timeout
        self.max_chars = max_chars
        self.session = session or pooled_session(32)
        self.session.trust_env = False
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="enhance")

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptEnhancer:
        return cls(settings.chat_worker_url, settings.chat_worker_api_key or settings.wan_worker_api_key,
                   settings.wan_enhance_template, settings.wan_enhance_timeout_seconds, settings.max_prompt_chars)

    def instruction(self) -> str:
        try:
            text = self.template.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise EnhanceError("the enhancement template cannot be read (WAN_ENHANCE_TEMPLATE)", 503) from None
        if not text:
            raise EnhanceError("the enhancement template is empty (WAN_ENHANCE_TEMPLATE)", 503)
        return text

    def messages(self, prompt: str, instruction: str | None = None) -> list[dict[str, str]]:
        text = instruction or self.instruction()
        if "{prompt}" in text:
            return [{"role": "user", "content": text.replace("{prompt}", prompt)}]
        return [{"role": "system", "content": text}, {"role": "user", "content": prompt}]

    def enhance(self, prompt: str, model: str = DEFAULT_MODEL, instruction: str | None = None) -> str:
        """The rewritten prompt, or ``EnhanceError`` once the deadline has passed or the answer is unusable."""
        body = {"messages": self.messages(prompt, instruction), "model": model, "max_tokens": MAX_TOKENS}
        deadline = time.monotonic() + self.timeout
        future = self._pool.submit(logs.carry(self._exchange), body, deadline)   # its lines keep the job's fields
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()) + 0.05)
        except FutureTimeout:
            future.cancel()
            raise EnhanceError(f"the chat worker did not answer within {self.timeout:g} s", 503) from None

    def try_enhance(self, prompt: str, instruction: str | None = None) -> Enhancement:
        """``enhance()`` for a job: never raises; a failure keeps the original prompt and says why."""
        started = time.monotonic()
        if not prompt.strip():
            return Enhancement(prompt, False, error="empty prompt: nothing to enhance")
        try:
            text = self.enhance(prompt, DEFAULT_MODEL, instruction)
        except EnhanceError as exc:
            log.warning("prompt enhancement failed: %s", exc.message)
            return Enhancement(prompt, False, error=exc.message, seconds=time.monotonic() - started)
        return Enhancement(text, True, DEFAULT_MODEL, seconds=time.monotonic() - started)

    def _exchange(self, body: dict[str, Any], deadline: float) -> str:
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        problem = "no attempt made"
        for attempt in range(TRIES):
            remaining = deadline - time.monotonic()
            if attempt:
                pause = min(0.5 * 2 ** (attempt - 1), remaining - 0.5)
                if pause < 0:
                    break
                time.sleep(pause)
                remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                response = self.session.post(self.url, json=body, headers=headers,
                                             timeout=(min(5.0, remaining), remaining))
            except requests.Timeout:
                raise EnhanceError(f"the chat worker did not answer within {self.timeout:g} s", 503) from None
            except requests.RequestException as exc:
                problem = f"chat worker unreachable ({type(exc).__name__})"
                continue
            if response.status_code >= 500 or response.status_code == 429:
                problem = f"chat worker answered HTTP {response.status_code}"
                continue
            return self._parse(response)
        raise EnhanceError(problem, 503)

    def _parse(self, response: requests.Response) -> str:
        if response.status_code in (401, 403):
            raise EnhanceError("the chat worker refused our credentials", 502)
        if response.status_code != 200:
            raise EnhanceError(f"chat worker answered HTTP {response.status_code}", 502)
        try:
            answer = response.json()
        except ValueError:
            raise EnhanceError("chat worker answered with invalid JSON", 502) from None
        text = answer.get("enhanced_prompt") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text.strip() or answer.get("success") is False:
            raise EnhanceError("chat worker gave no enhanced prompt", 502)
        return clean(text, self.max_chars)


def clean(text: str, max_chars: int) -> str:
    """Trim whitespace and one pair of wrapping quotes; cap the length."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text[:max_chars]

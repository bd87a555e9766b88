"""Request bodies (HTTP JSON and chat-queue jobs) decoded into a frozen ``ChatRequest``.

Every bad field raises ``InvalidJob`` naming the field (``max_tokens must be an integer in [1, 4096], got 0``);
HTTP maps it to 400, the job loop to a ``failed`` callback. Unknown keys are ignored.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from workers.core.errors import InvalidJob
from workers.core.params import describe, finite_number

from .models import ModelName
from .prompt import Message, Role
from .sampling import MAX_NEW_TOKENS, SamplingParams

MAX_MESSAGES = 256
MAX_TOTAL_CHARS = 200_000
DEFAULT_MAX_TOKENS = 512
ENHANCE_MAX_TOKENS = 200
MODEL_ALIASES = {"qwen_instruct": ModelName.INSTRUCT, "instruct": ModelName.INSTRUCT,
                 "qwen_base": ModelName.BASE, "base": ModelName.BASE}


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]      # empty for the raw-text form
    text: str | None                   # raw prompt: /generate {"inputs": ...}
    sampling: SamplingParams
    model: ModelName = ModelName.INSTRUCT
    sfw_mode: bool = False
    return_full_text: bool = False


class Fields:
    """Typed reads of one body; ``label(key)`` names a field in messages (``config.max_tokens``)."""

    def __init__(self, body: Mapping[str, Any], label: Callable[[str], str] = str):
        self.body = body
        self.label = label

    def get(self, key: str) -> Any:
        return self.body.get(key)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.body.get(key)
        if value is None:
            return default
        number = finite_number(value)
        if number is None or not lo <= number <= hi:
            raise InvalidJob(f"{self.label(key)} must be a number in [{lo:g}, {hi:g}], got {describe(value)}")
        return number

    def integer(self, key: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.body.get(key)
        if value is None:
            return default
        number = finite_number(value)
        if number is None or not number.is_integer() or not lo <= number <= hi:
            raise InvalidJob(f"{self.label(key)} must be an integer in [{lo}, {hi}], got {describe(value)}")
        return int(number)

    def flag(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InvalidJob(f"{self.label(key)} must be true or false, got {describe(value)}")

    def text(self, key: str, required: bool = False) -> str | None:
        value = self.body.get(key)
        if value is None:
            if required:
                raise InvalidJob(f"{self.label(key)} is required: a non-empty string")
            return None
        if not isinstance(value, str):
            raise InvalidJob(f"{self.label(key)} must be a string, got {describe(value)}")
        if required and not value.strip():
            raise InvalidJob(f"{self.label(key)} must not be empty")
        if len(value) > MAX_TOTAL_CHARS:
            raise InvalidJob(f"{self.label(key)} is too long ({len(value)} characters, at most {MAX_TOTAL_CHARS})")
        return value

    def model(self, default: ModelName = ModelName.INSTRUCT) -> ModelName:
        value = self.body.get("model")
        if value is None or value == "":
            return default
        name = MODEL_ALIASES.get(value.strip().lower().replace("-", "_")) if isinstance(value, str) else None
        if name is None:
            raise InvalidJob(f"{self.label('model')} must be qwen_instruct or qwen_base, got {describe(value)}")
        return name

    def messages(self, roles: Mapping[str, Role] | None = None) -> tuple[Message, ...]:
        roles = roles or {r.value: r for r in Role}
        value = self.body.get("messages")
        where = self.label("messages")
        if value is None:
            raise InvalidJob(f"{where} is required: a non-empty list of {{role, content}} objects")
        if not isinstance(value, list):
            raise InvalidJob(f"{where} must be a list of {{role, content}} objects, got {type(value).__name__}")
        if not value:
            raise InvalidJob(f"{where} must not be empty")
        if len(value) > MAX_MESSAGES:
            raise InvalidJob(f"{where} has {len(value)} messages, at most {MAX_MESSAGES}")
        out = tuple(_message(item, f"{where}[{i}]", roles) for i, item in enumerate(value))
        total = sum(len(m.content) for m in out)
        if total > MAX_TOTAL_CHARS:
            raise InvalidJob(f"{where} are too long ({total} characters, at most {MAX_TOTAL_CHARS})")
        return out

    def sampling(self, max_tokens_default: int = DEFAULT_MAX_TOKENS, max_tokens_key: str = "max_tokens"
                 ) -> SamplingParams:
        return SamplingParams(
            temperature=self.number("temperature", 0.7, 0.0, 2.0),
            top_p=self.number("top_p", 0.9, 0.0, 1.0),
            max_tokens=self.integer(max_tokens_key, max_tokens_default, 1, MAX_NEW_TOKENS),
            presence_penalty=self.number("presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=self.number("frequency_penalty", 0.0, -2.0, 2.0),
            seed=self._seed())

    def _seed(self) -> int | None:
        value = self.body.get("seed")
        if value is None:
            return None
        number = finite_number(value)
        if number is None or not number.is_integer():
            raise InvalidJob(f"{self.label('seed')} must be an integer, got {describe(value)}")
        return (value if isinstance(value, int) else int(number)) % (1 << 63)


def chat_request(fields: Fields, max_tokens_default: int = DEFAULT_MAX_TOKENS) -> ChatRequest:
    """``/chat``, ``/chat/unrestricted`` and the chat-queue conversation types."""
    return ChatRequest(messages=fields.messages(), text=None, sampling=fields.sampling(max_tokens_default),
                       model=fields.model(), sfw_mode=fields.flag("sfw_mode", False))


def generate_request(body: Mapping[str, Any]) -> ChatRequest:
    """``/generate``: the ``/chat`` body, or ``{"inputs": text, "parameters": {...}}`` (raw text, no template)."""
    if "inputs" not in body or "messages" in body:
        return chat_request(Fields(body))
    fields = Fields(body)
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidJob(f"parameters must be an object, got {type(parameters).__name__}")
    params = Fields(parameters, lambda key: f"parameters.{key}")
    sampling = params.sampling(DEFAULT_MAX_TOKENS, max_tokens_key="max_new_tokens")
    if not params.flag("do_sample", True):
        sampling = replace(sampling, temperature=0.0)
    return ChatRequest(messages=(), text=fields.text("inputs", required=True), sampling=sampling,
                       model=fields.model(), sfw_mode=fields.flag("sfw_mode", False),
                       return_full_text=params.flag("return_full_text", False))


def enhance_request(fields: Fields, instruction: str, prompt_key: str = "prompt") -> tuple[ChatRequest, str]:
    """``/enhance`` and ``chat_enhance``: ``messages`` (the instruction is added as the system message when
    there is none), or a bare ``prompt``. Returns the request and the original prompt."""
    if fields.get("messages") is None and fields.get(prompt_key) is not None:
        original = fields.text(prompt_key, required=True)
        messages: tuple[Message, ...] = (Message(Role.USER, original),)
    else:
        messages = fields.messages()
        original = next((m.content for m in reversed(messages) if m.role is Role.USER), messages[-1].content)
    if not any(m.role is Role.SYSTEM for m in messages):
        messages = (Message(Role.SYSTEM, instruction),) + messages
    request = ChatRequest(messages=messages, text=None, sampling=fields.sampling(ENHANCE_MAX_TOKENS),
                          model=fields.model(), sfw_mode=fields.flag("sfw_mode", False))
    return request, original


OPENAI_ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}


def openai_request(body: Mapping[str, Any]) -> tuple[ChatRequest, bool]:
    """``/v1/chat/completions``: OpenAI's body (``max_completion_tokens`` or ``max_tokens``, ``n`` = 1 only)."""
    fields = Fields(body)
    fields.integer("n", 1, 1, 1)  # one choice per request
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    request = ChatRequest(messages=fields.messages(OPENAI_ROLES), text=None,
                          sampling=fields.sampling(DEFAULT_MAX_TOKENS, max_tokens_key=key),
                          model=fields.model(), sfw_mode=fields.flag("sfw_mode", False))
    return request, fields.flag("stream", False)


def _message(item: Any, where: str, roles: Mapping[str, Role]) -> Message:
    if not isinstance(item, dict):
        raise InvalidJob(f"{where} must be an object with role and content, got {type(item).__name__}")
    role = item.get("role")
    if not isinstance(role, str) or role not in roles:
        raise InvalidJob(f"{where}.role must be one of {', '.join(roles)}, got {describe(role)}")
    content = item.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise InvalidJob(f"{where}.content parts must all be {{\"type\": \"text\", \"text\": ...}}")
        content = "".join(p["text"] for p in content)
    if content is None:
        raise InvalidJob(f"{where}.content is required (a string)")
    if not isinstance(content, str):
        raise InvalidJob(f"{where}.content must be a string, got {type(content).__name__}")
    return Message(roles[role], content)





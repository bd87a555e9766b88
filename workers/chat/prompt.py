"""Prompt building: messages through the model's chat template, cut to the context from the oldest turns.

The system message(s) and the newest message always stay; the oldest other turns go first. A raw text
prompt (``/generate`` with ``inputs``) keeps its newest tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from workers.core.errors import InvalidJob

from .models import LoadedModel


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role.value, "content": self.content}


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_messages: int = 0
    dropped_tokens: int = 0

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_messages or self.dropped_tokens)


def prompt_budget(model: LoadedModel, max_tokens: int) -> int:
    """Tokens the prompt may use: the context less the reply's room (at most half the context is reserved,
    so a large ``max_tokens`` never squeezes the history out; generation then stops at the context end)."""
    return model.max_context - min(max_tokens, model.max_context // 2)


def chat_prompt(model: LoadedModel, messages: tuple[Message, ...], budget: int) -> Prompt:
    """Token ids for ``messages``, dropping the fewest oldest turns needed to fit ``budget``."""
    history = [i for i, m in enumerate(messages[:-1]) if m.role is not Role.SYSTEM]

    def attempt(drop: int) -> list[int]:
        gone = set(history[:drop])
        return _render(model, [m for i, m in enumerate(messages) if i not in gone])

    ids = attempt(0)
    if len(ids) <= budget:
        return Prompt(ids)
    minimal = attempt(len(history))
    if len(minimal) > budget:
        raise InvalidJob(f"messages are too long: the system message and the newest message take {len(minimal)} "
                         f"tokens, at most {budget} fit the context")
    lo, hi = 1, len(history)  # the fewest dropped turns that fit: lengths shrink as more are dropped
    while lo < hi:
        mid = (lo + hi) // 2
        if len(attempt(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return Prompt(attempt(lo), dropped_messages=lo)


def text_prompt(model: LoadedModel, text: str, budget: int) -> Prompt:
    ids = model.encode(text)
    if len(ids) <= budget:
        return Prompt(ids)
    return Prompt(ids[-budget:], dropped_tokens=len(ids) - budget)


def _render(model: LoadedModel, messages: list[Message]) -> list[int]:
    if model.has_chat_template:
        return model.encode(model.render([m.as_dict() for m in messages]))
    return model.encode(_plain(messages))


def _plain(messages: list[Message]) -> str:
    """A plain-text layout for a tokenizer without a chat template (a bare base model)."""
    lines = []
    for m in messages:
        if m.role is Role.SYSTEM:
            lines.append(m.content + "\n")
        else:
            lines.append(f"{m.role.value.capitalize()}: {m.content}")
    return "\n".join(lines) + "\nAssistant:"

"""The job message (CONTRACT §1–§2): decoding a queue element into a frozen ``Job``.

A list element arrives as a JSON object, a one-element JSON array holding the job's JSON as a string
(the current producer), or a one-element JSON array holding the object. Anything else is ``InvalidJob``;
once the id is known the error carries it, so the runner can send a ``failed`` callback instead of only
dead-lettering the element.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from .errors import InvalidJob

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")  # \Z: "$" would let a trailing newline in
MAX_ELEMENT_BYTES = 1_000_000


class Queue(str, Enum):
    SDXL = "sdxl_queue"
    WAN = "wan_queue"
    CHAT = "chat_queue"


class OutputKind(str, Enum):
    IMAGE = "image"
    VIDEO = "video"
    TEXT = "text"


class JobType(str, Enum):
    SDXL_IMAGE_FAST = "sdxl_image_fast"
    SDXL_IMAGE_HIGH = "sdxl_image_high"
    VIDEO_FAST = "video_fast"
    VIDEO_HIGH = "video_high"
    IMAGE_FAST = "image_fast"
    IMAGE_HIGH = "image_high"
    IMAGE7B_FAST_ENHANCED = "image7b_fast_enhanced"
    IMAGE7B_HIGH_ENHANCED = "image7b_high_enhanced"
    VIDEO7B_FAST_ENHANCED = "video7b_fast_enhanced"
    VIDEO7B_HIGH_ENHANCED = "video7b_high_enhanced"
    CHAT_ENHANCE = "chat_enhance"
    CHAT_CONVERSATION = "chat_conversation"
    CHAT_UNRESTRICTED = "chat_unrestricted"
    ADMIN_UTILITIES = "admin_utilities"

    @classmethod
    def parse(cls, name: str) -> JobType:
        """The type for a wire name, accepting the ``wan_video_*`` aliases."""
        name = ALIASES.get(name, name)
        return cls(name)

    @property
    def queue(self) -> Queue:
        if self.value.startswith("sdxl_"):
            return Queue.SDXL
        if self.value.startswith(("chat_", "admin_")):
            return Queue.CHAT
        return Queue.WAN

    @property
    def output_kind(self) -> OutputKind:
        if self.queue is Queue.CHAT:
            return OutputKind.TEXT
        return OutputKind.VIDEO if self.value.startswith("video") else OutputKind.IMAGE

    @property
    def tier(self) -> str:
        """``fast`` or ``high`` for generation types, ``""`` for chat."""
        for tier in ("fast", "high"):
            if f"_{tier}" in self.value:
                return tier
        return ""

    @property
    def enhanced(self) -> bool:
        return self.value.endswith("_enhanced")


ALIASES = {"wan_video_fast": "video_fast", "wan_video_high": "video_high"}


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Job:
    id: str
    type: JobType
    user_id: str
    prompt: str = ""
    negative_prompt: str = ""
    config: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    metadata: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    compel_enabled: bool = False
    compel_weights: str = ""
    top: Mapping[str, Any] = field(default_factory=lambda: _frozen({}), repr=False)

    @property
    def queue(self) -> Queue:
        return self.type.queue

    def lookup(self, *paths: str) -> tuple[str, Any] | None:
        """First present, non-null value among dotted paths (``config.steps``, ``metadata.seed``,
        ``negative_prompt`` for a top-level key), as ``(path, value)``; ``None`` when none is set."""
        for path in paths:
            scope, _, key = path.partition(".")
            if not key:
                source, key = self.top, scope
            else:
                source = {"config": self.config, "metadata": self.metadata}[scope]
            value = source.get(key)
            if value is not None:
                return path, value
        return None


def decode(element: bytes | str) -> Job:
    """Decode one queue element (any of the three forms) into a ``Job`` or raise ``InvalidJob``."""
    obj = _unwrap(element)
    job_id = obj.get("id", obj.get("job_id"))
    if job_id is None:
        raise InvalidJob("job has no 'id'")
    if not isinstance(job_id, str) or not SAFE_ID.match(job_id):
        raise InvalidJob("'id' must be a uuid or a safe identifier (letters, digits, '-', '_')")
    try:
        return _fields(obj, job_id)
    except InvalidJob as exc:
        exc.job_id = job_id
        raise


def _unwrap(element: bytes | str) -> dict[str, Any]:
    if isinstance(element, (bytes, bytearray)):
        if len(element) > MAX_ELEMENT_BYTES:
            raise InvalidJob(f"element is larger than {MAX_ELEMENT_BYTES} bytes")
        try:
            element = element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJob("element is not UTF-8 text") from None
    if len(element) > MAX_ELEMENT_BYTES:
        raise InvalidJob(f"element is larger than {MAX_ELEMENT_BYTES} bytes")
    value = _loads(element, "element")
    if isinstance(value, list):
        if len(value) != 1:
            raise InvalidJob(f"element is a JSON array of {len(value)} items; expected exactly one")
        value = value[0]
        if isinstance(value, str):
            value = _loads(value, "the array's string item")
    if not isinstance(value, dict):
        raise InvalidJob(f"job must be a JSON object, got {type(value).__name__}")
    return value


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidJob(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise InvalidJob(f"{what} is not valid JSON ({exc.msg} at position {exc.pos})") from None


def _fields(obj: dict[str, Any], job_id: str) -> Job:
    type_name = obj.get("type") or obj.get("job_type")
    if type_name is None:
        raise InvalidJob("job has no 'type'")
    if not isinstance(type_name, str):
        raise InvalidJob("'type' must be a string")
    try:
        job_type = JobType.parse(type_name)
    except ValueError:
        raise InvalidJob(f"unknown job type {type_name[:64]!r}") from None
    user_id = obj.get("user_id")
    if user_id is None:
        raise InvalidJob("job has no 'user_id'")
    if not isinstance(user_id, str) or not SAFE_ID.match(user_id):
        raise InvalidJob("'user_id' must be a uuid or a safe identifier (letters, digits, '-', '_')")
    return Job(
        id=job_id,
        type=job_type,
        user_id=user_id,
        prompt=_string(obj, "prompt"),
        negative_prompt=_string(obj, "negative_prompt"),
        config=_frozen(_object(obj, "config")),
        metadata=_frozen(_object(obj, "metadata")),
        compel_enabled=_boolean(obj, "compel_enabled"),
        compel_weights=_string(obj, "compel_weights"),
        top=_frozen(obj),
    )


def _string(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidJob(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _object(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidJob(f"'{key}' must be an object or null, got {type(value).__name__}")
    return value


def _boolean(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidJob(f"'{key}' must be true or false, got {type(value).__name__}")
    return value

"""Typed readers for job parameters: first present field wins, bad values name the field.

Every model handler reads its parameters through these, so a malformed value always becomes
``InvalidJob`` with a message such as ``config.num_inference_steps must be an integer in [1, 150], got -3``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from .errors import InvalidJob
from .job import Job

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[x*×]\s*(\d{1,5})\s*$")


def describe(value: Any) -> str:
    """A short repr of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(job: Job, paths: Sequence[str], default: int | None, lo: int, hi: int) -> int | None:
    found = job.lookup(*paths)
    if found is None:
        return default
    path, value = found
    number = finite_number(value)
    if number is None or not float(number).is_integer() or not lo <= number <= hi:
        raise InvalidJob(f"{path} must be an integer in [{lo}, {hi}], got {describe(value)}")
    return int(number)


def real(job: Job, paths: Sequence[str], default: float | None, lo: float, hi: float) -> float | None:
    found = job.lookup(*paths)
    if found is None:
        return default
    path, value = found
    number = finite_number(value)
    if number is None or not lo <= number <= hi:
        raise InvalidJob(f"{path} must be a number in [{lo}, {hi}], got {describe(value)}")
    return float(number)


def text(job: Job, paths: Sequence[str], default: str | None, max_len: int = 10_000) -> str | None:
    found = job.lookup(*paths)
    if found is None:
        return default
    path, value = found
    if not isinstance(value, str):
        raise InvalidJob(f"{path} must be a string, got {describe(value)}")
    if len(value) > max_len:
        raise InvalidJob(f"{path} is longer than {max_len} characters")
    return value


def flag(job: Job, paths: Sequence[str], default: bool = False) -> bool:
    found = job.lookup(*paths)
    if found is None:
        return default
    path, value = found
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidJob(f"{path} must be true or false, got {describe(value)}")


def size(job: Job, paths: Sequence[str]) -> tuple[str, int, int] | None:
    """A ``"WxH"`` (or ``"W*H"``) size as ``(path, width, height)``; ``None`` when absent."""
    found = job.lookup(*paths)
    if found is None:
        return None
    path, value = found
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise InvalidJob(f"{path} must look like '1024x576' with positive numbers, got {describe(value)}")
    return path, int(match.group(1)), int(match.group(2))


def finite_number(value: Any) -> float | None:
    """A finite number from a JSON number or numeric string (never a bool); ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None

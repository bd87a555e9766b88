"""Parsers of environment variables: each turns one variable's text into a value or a one-line ``ConfigError``
that names the variable and never echoes the value. ``common.declare`` attaches them to settings fields;
``Reader`` applies them one variable at a time for knobs that are not declared (the soak test's)."""
from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from common.errors import ConfigError

T = TypeVar("T")


class Secret:
    """A string that never shows itself: ``repr``/``str`` print ``***``; ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Invalid(ValueError):
    """A parser's own complaint, where "must be <expected>" says too little; ``{name}`` becomes the variable."""


@dataclass(frozen=True)
class Parser(Generic[T]):
    """Turns one variable's text (stripped, never empty) into a value, or raises ``ValueError``; the error
    then reads ``<NAME> must be <expected>``."""

    parse: Callable[[str], T]
    expected: str

    def __call__(self, name: str, value: str) -> T:
        try:
            return self.parse(value)
        except Invalid as exc:
            raise ConfigError(str(exc).replace("{name}", name)) from None
        except (ValueError, TypeError, KeyError):
            raise ConfigError(f"{name} must be {self.expected}") from None


def raw(env: Mapping[str, str], name: str) -> str | None:
    """A variable's text, stripped; unset and blank are the same: not set."""
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _within(value: float, lo: float, hi: float) -> float:
    if not lo <= value <= hi:
        raise ValueError
    return value


def number(lo: float, hi: float) -> Parser[float]:
    return Parser(lambda v: _within(float(v), lo, hi), f"a number between {lo:g} and {hi:g}")


def integer(lo: int, hi: int) -> Parser[int]:
    def parse(value: str) -> int:
        number_ = _within(float(value), lo, hi)
        if not number_.is_integer():
            raise ValueError
        return int(number_)
    return Parser(parse, f"a whole number between {lo} and {hi}")


def megabytes(lo: float, hi: float) -> Parser[int]:
    """Megabytes (MiB, fractions allowed) as a whole number of bytes."""
    return Parser(lambda v: int(_within(float(v), lo, hi) * 1024 * 1024), f"megabytes between {lo:g} and {hi:g}")


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def boolean() -> Parser[bool]:
    return Parser(lambda v: _BOOLEANS[v.lower()], "true or false")


def choice(*options: str) -> Parser[str]:
    """One of ``options``, case-insensitive; the value is the option as declared."""
    table = {o.lower(): o for o in options}
    return Parser(lambda v: table[v.lower()], "one of " + ", ".join(options))


def text() -> Parser[str]:
    return Parser(str, "text")


def secret() -> Parser[Secret]:
    return Parser(Secret, "text")


def path() -> Parser[Path]:
    return Parser(lambda v: Path(v).expanduser(), "a path")


def url() -> Parser[str]:
    def parse(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError
        return value.rstrip("/")
    return Parser(parse, "an http(s) URL")


def identifier() -> Parser[str]:
    def parse(value: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in value) or len(value) > 128:
            raise ValueError
        return value
    return Parser(parse, "letters, digits, '-', '_' or '.' (at most 128)")


def host_list() -> Parser[frozenset[str]]:
    """``a.example, [::1]`` -> the lower-cased hosts, brackets dropped."""
    return Parser(lambda v: frozenset(h.strip().lower().strip("[]") for h in v.split(",") if h.strip()),
                  "a comma-separated list of hosts")


def torch_device() -> Parser[str]:
    """A torch device name as the workers' resolver takes it: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    def parse(value: str) -> str:
        name = value.lower()
        kind, sep, index = name.partition(":")
        if name in ("auto", "cpu", "cuda") or (kind == "cuda" and sep and index.isdigit() and len(index) <= 3):
            return name
        raise ValueError
    return Parser(parse, "auto, cpu, cuda or cuda:N")


def command() -> Parser[tuple[str, ...]]:
    """A shell-style command line (``shlex``), at least one word."""
    def parse(value: str) -> tuple[str, ...]:
        try:
            words = tuple(shlex.split(value))
        except ValueError:
            raise Invalid("{name} must be a shell-style command line") from None
        if not words:
            raise Invalid("{name} must name a program")
        return words
    return Parser(parse, "a command line")


def pairs(keys: Sequence[str], value: Parser[T], base: Mapping[str, T] | None = None) -> Parser[dict[str, T]]:
    """``"sdxl:0,chat:1"`` -> ``{"sdxl": 0, "chat": 1}`` (over ``base``): keys from ``keys``, values through
    ``value``."""
    def parse(text_: str) -> dict[str, T]:
        result = dict(base or {})
        for item in text_.split(","):
            key, sep, item_value = item.strip().partition(":")
            key = key.strip().lower()
            if not sep or key not in keys:
                raise Invalid("{name} must be a list like " + f"{keys[0]}:<value>,... with names from "
                              + ", ".join(keys))
            try:
                result[key] = value.parse(item_value.strip())
            except (ValueError, TypeError, KeyError):
                raise Invalid("{name}: " + f"the value for {key} must be {value.expected}") from None
        return result
    return Parser(parse, "a list of name:value pairs")


class Reader:
    """Parses one variable at a time, for settings that are not declared (the soak test's knobs)."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, name: str) -> str | None:
        return raw(self.env, name)

    def _get(self, name: str, parser: Parser[T], default: Any) -> Any:
        value = self.raw(name)
        return default if value is None else parser(name, value)

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def secret(self, name: str) -> Secret | None:
        return self._get(name, secret(), None)

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        return self._get(name, number(lo, hi), default)

    def boolean(self, name: str, default: bool) -> bool:
        return self._get(name, boolean(), default)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        return self._get(name, choice(*options), default)

    def url(self, name: str) -> str | None:
        return self._get(name, url(), None)

    def identifier(self, name: str) -> str | None:
        return self._get(name, identifier(), None)

    def path(self, name: str) -> Path | None:
        return self._get(name, path(), None)

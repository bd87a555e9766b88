"""Declared settings: each environment variable is declared once, as a field of a frozen dataclass.

``var("JOB_MAX_ATTEMPTS", integer(1, 100), 3, "attempts before a job goes to the dead list")`` gives the field
its variable, parser (with its bounds), default and one line of documentation. From those declarations alone
come the parsing (``Declared.from_env``), ``require`` and ``/debug/env``'s report (``is_set``), and README's
settings tables (``markdown``). A class declares one group of variables; a process's settings class inherits
the groups it uses (flat fields), so no process parses a variable it does not read.

A malformed value raises ``ConfigError`` with one line naming the variable, never echoing the value.
"""
from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from common.errors import ConfigError

T = TypeVar("T")
KEY = "<key>"   # in the doc of a family of variables (``each``): replaced by the key of each one


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


@dataclass(frozen=True)
class Var:
    """One declaration: the variable (or, with ``each``, one variable per key), its parser and its doc."""

    env: str
    parser: Parser
    doc: str
    aliases: tuple[str, ...] = ()
    shown: str | None = None                  # the default as README shows it, where the value would mislead
    each: Mapping[str, str] | None = None     # key -> variable: the field is a mapping of the ones set

    def names(self) -> tuple[str, ...]:
        return tuple(self.each.values()) if self.each else (self.env,)


def var(env: str, parser: Parser[T], default: Any, doc: str, *, aliases: tuple[str, ...] = (),
        shown: str | None = None) -> Any:
    """A dataclass field read from ``env`` (else the first set alias, else ``default``)."""
    declared = Var(env, parser, doc, aliases=aliases, shown=shown)
    if isinstance(default, (dict, list, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"var": declared})
    return field(default=default, metadata={"var": declared})


def each(names: Mapping[str, str], parser: Parser[T], defaults: Mapping[str, T], doc: str) -> Any:
    """A mapping field, one variable per key (``names``: key -> variable); keys unset keep ``defaults``.
    ``<key>`` in ``doc`` is replaced by each key for README."""
    declared = Var(" ".join(names.values()), parser, doc, each=dict(names))
    return field(default_factory=lambda: dict(defaults), metadata={"var": declared})


def raw(env: Mapping[str, str], name: str) -> str | None:
    """A variable's text, stripped; unset and blank are the same: not set."""
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


@dataclass(frozen=True)
class Declared:
    """Base of every settings class: parsing, ``require`` and ``is_set`` from the fields' declarations.

    A group may define ``_check(self)`` for rules across its fields; ``from_env`` runs every group's."""

    @classmethod
    def declarations(cls) -> Iterator[tuple[Field, Var]]:
        for f in dataclasses.fields(cls):
            if "var" in f.metadata:
                yield f, f.metadata["var"]

    @classmethod
    def env_names(cls) -> list[str]:
        """Every variable this class reads, aliases included."""
        return [name for _, v in cls.declarations() for name in (*v.names(), *v.aliases)]

    @classmethod
    def from_env(cls, env: Mapping[str, str], **given: Any):
        """Parse every declared field from ``env``; ``given`` fills fields that are not variables."""
        values = {f.name: _read(env, f, v) for f, v in cls.declarations()}
        settings = cls(**values, **given)
        for klass in reversed(cls.__mro__):
            check = klass.__dict__.get("_check")
            if check is not None:
                check(settings)
        return settings

    @classmethod
    def env_of(cls, name: str) -> str:
        """The variable a field is read from (``sdxl_model_path`` -> ``SDXL_MODEL_PATH``)."""
        return cls.__dataclass_fields__[name].metadata["var"].env

    def require(self, *names: str) -> None:
        """Raise ``ConfigError`` naming the variable of the first of these fields that is unset."""
        for name in names:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"{self.env_of(name)} is not set")

    def is_set(self) -> dict[str, bool]:
        """Variable name -> whether its setting differs from the default (names only, never a value)."""
        report = {}
        for f, v in self.declarations():
            value, default = getattr(self, f.name), default_of(f)
            if v.each:
                report |= {name: value.get(key) != default.get(key) for key, name in v.each.items()}
            else:
                report[v.env] = value != default
        return report


def default_of(f: Field) -> Any:
    """A field's default (a fresh copy where it is built by a factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _read(env: Mapping[str, str], f: Field, v: Var) -> Any:
    if v.each:
        values = dict(default_of(f))
        for key, name in v.each.items():
            text = raw(env, name)
            if text is not None:
                values[key] = v.parser(name, text)
        return values
    for name in (v.env, *v.aliases):
        text = raw(env, name)
        if text is not None:
            return v.parser(name, text)
    return default_of(f)


# -- parsers -------------------------------------------------------------------------------------------------

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

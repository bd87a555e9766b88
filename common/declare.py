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
import sys
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, TypeVar

from common.errors import ConfigError
from common.exit_codes import ExitCode
from common.parsers import Parser, raw

T = TypeVar("T")
KEY = "<key>"   # in the doc of a family of variables (``each``): replaced by the key of each one


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
    def for_process(cls, env: Mapping[str, str], prog: str):
        """An entry point's settings: on a bad value, one line ``<prog>: configuration error: …`` on stderr (the
        message names the variable, never its value) and exit ``ExitCode.CONFIG_ERROR``, never a traceback."""
        try:
            return cls.from_env(env)
        except ConfigError as exc:
            print(f"{prog}: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(ExitCode.CONFIG_ERROR) from None

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

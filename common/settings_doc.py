"""README's settings tables, generated from the declarations (``common.declare``), so they cannot drift.

``markdown({"SDXL worker": [SdxlSettings], ...})`` gives one section per group (a class that declares variables
itself), in the order the processes first use them, each saying which processes read it, with one row per
variable. The caller names the processes: this kernel module imports none of them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.declare import KEY, Declared, Var, default_of
from common.parsers import Secret


def groups(cls: type[Declared]) -> list[type[Declared]]:
    """The groups a settings class is made of: its bases' first (in their order), then its own variables."""
    found = [k for k in cls.__mro__[1:] if _declares(k)]
    return found + [cls] if _declares(cls) else found


def _declares(klass: type) -> bool:
    own = klass.__dict__.get("__annotations__", {})
    fields = klass.__dict__.get("__dataclass_fields__", {})
    return any(name in fields and "var" in fields[name].metadata for name in own)


def own_declarations(group: type[Declared]) -> list[tuple[str, Var, Any]]:
    """(field name, declaration, default) of the variables ``group`` declares itself, in source order."""
    fields = group.__dataclass_fields__
    return [(name, fields[name].metadata["var"], default_of(fields[name]))
            for name in group.__dict__.get("__annotations__", {}) if "var" in fields[name].metadata]


def shown(value: Any) -> str:
    """A default as a reader would write it in the environment."""
    if value is None or isinstance(value, Secret):
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (frozenset, set, tuple, list)):
        return f"`{','.join(sorted(value) if isinstance(value, (set, frozenset)) else value)}`" if value else "empty"
    if isinstance(value, Mapping):
        return f"`{','.join(f'{k}:{shown(v)}' for k, v in value.items())}`" if value else "—"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    return f"`{value}`"


def rows(group: type[Declared]) -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every variable ``group`` declares; a family (``each``) one row per key."""
    out = []
    for _, v, default in own_declarations(group):
        if v.each:
            out += [(f"`{name}`", shown(default.get(key)), v.doc.replace(KEY, key)) for key, name in v.each.items()]
            continue
        doc = v.doc + "".join(f" (also read as `{alias}`)" for alias in v.aliases)
        out.append((f"`{v.env}`", v.shown if v.shown is not None else shown(default), doc))
    return out


def markdown(processes: Mapping[str, Sequence[type[Declared]]], level: str = "###") -> str:
    """The settings sections of every group the processes use, each listing its readers."""
    order: list[type[Declared]] = []
    for classes in processes.values():
        for cls in classes:
            order += [g for g in groups(cls) if g not in order]
    sections = []
    for group in order:
        readers = [name for name, classes in processes.items() if any(issubclass(c, group) for c in classes)]
        title = (group.__doc__ or group.__name__).strip().splitlines()[0]
        table = ["| variable | default | meaning |", "|---|---|---|"]
        table += [f"| {name} | {default} | {doc} |" for name, default, doc in rows(group)]
        sections.append(f"{level} {title}\n\nRead by: {', '.join(readers)}.\n\n" + "\n".join(table) + "\n")
    return "\n".join(sections)

"""The benchmark's record: rows of the results table, output checks, per-section details and errors.

Written as JSON after every section (so a run cut short still leaves what it measured) and printed as a
table at the end. A row compares our worker path with the plain eager baseline on the same modules:
``ratio`` is always the speed-up of ours (baseline time / ours, or ours rate / baseline rate). ``library`` is
the strongest recipe the library documents, run in the same process on the same modules and inputs
(bench/peers.py, bench/peers_chat.py), and ``library_ratio`` ours against it in the same convention; a row
where no recipe applies leaves both ``None`` ("-" in the table).
"""
from __future__ import annotations

import json
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    key: str
    work: str
    unit: str                          # "s" (lower is better), "tok/s" (higher is better), "GB"
    baseline: float | None = None
    ours: float | None = None
    peak_gb: float | None = None       # ours; the baseline's peak goes in ``details``
    target: str = ""                   # e.g. "<= 0.8 s"; "" when the issue sets none
    met: bool | None = None
    note: str = ""
    library: float | None = None       # the library's documented recipe, same unit
    library_note: str = ""             # which recipe, and what it leaves out against ours

    @property
    def ratio(self) -> float | None:
        return _speedup(self.unit, self.baseline, self.ours)

    @property
    def library_ratio(self) -> float | None:
        return _speedup(self.unit, self.library, self.ours)


def _speedup(unit: str, reference: float | None, ours: float | None) -> float | None:
    """How much better ours is than ``reference``: a rate over a rate ("tok/s"), else reference over ours."""
    if not reference or not ours:
        return None
    return ours / reference if unit == "tok/s" else reference / ours


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    meta: dict[str, Any]
    path: Path | None = None
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    libraries: dict[str, tuple[float | None, str]] = field(default_factory=dict)   # row key -> (library, note)

    def add(self, row: Row, limit: tuple[str, float] | None = None) -> Row:
        """Record ``row``; ``limit`` (``("<=", 0.8)`` or ``(">=", 140)``) judges ``row.ours`` against a target."""
        if limit is not None and row.ours is not None:
            op, value = limit
            row.target = f"{op} {value:g} {row.unit}"
            row.met = row.ours <= value if op == "<=" else row.ours >= value
        if row.library is None and row.key in self.libraries:
            row.library, row.library_note = self.libraries[row.key]
        self.rows = [r for r in self.rows if r.key != row.key] + [row]
        print(f"[row] {row.work}: baseline={_fmt(row.baseline)} ours={_fmt(row.ours)} library={_fmt(row.library)} "
              f"{row.unit} ratio={_fmt(row.ratio)} vs library={_fmt(row.library_ratio)} peak={_fmt(row.peak_gb)} "
              f"{row.note}", flush=True)
        return row

    def library(self, key: str, value: float | None, note: str) -> None:
        """The library recipe's figure for row ``key``. The recipes run between the baseline and our path, so
        the row usually comes later; a row already added gets it at once."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"library value for {key!r} must be a number, got {value!r}")
        self.libraries[key] = (value, note)
        for row in self.rows:
            if row.key == key:
                row.library, row.library_note = value, note
        print(f"[library] {key}: {_fmt(value)} ({note})", flush=True)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(passed), detail))
        print(f"[check] {'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)

    def detail(self, section: str, key: str, value: Any) -> None:
        self.sections.setdefault(section, {})[key] = value

    def error(self, where: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.errors.append({"where": where, "error": f"{type(exc).__name__}: {exc}", "traceback": text[-4000:]})
        print(f"[error] {where}: {type(exc).__name__}: {exc}\n{text[-2500:]}", flush=True)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta,
                "rows": [asdict(r) | {"ratio": r.ratio, "library_ratio": r.library_ratio} for r in self.rows],
                "checks": [asdict(c) for c in self.checks],
                "sections": self.sections, "errors": self.errors}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        tmp.replace(self.path)

    def table(self) -> str:
        head = ("work", "baseline", "ours", "library", "unit", "ratio", "vs library", "peak GB", "target", "met")
        lines = [head]
        for r in self.rows:
            met = "" if r.met is None else ("yes" if r.met else "NO")
            lines.append((r.work, _fmt(r.baseline), _fmt(r.ours), _fmt(r.library), r.unit,
                          "" if r.ratio is None else f"{r.ratio:.2f}x",
                          "-" if r.library_ratio is None else f"{r.library_ratio:.2f}x", _fmt(r.peak_gb), r.target,
                          met))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
        out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for c in self.checks:
            out.append(f"check {'PASS' if c.passed else 'FAIL'}: {c.name}: {c.detail}")
        for e in self.errors:
            out.append(f"error in {e['where']}: {e['error']}")
        return "\n".join(out)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"

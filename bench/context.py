"""What every section gets: the profile, the report, the deadline, and a guard that runs one step."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .measure import Deadline
from .profile import Profile
from .report import Report

T = TypeVar("T")


@dataclass
class Context:
    profile: Profile
    report: Report
    deadline: Deadline
    shared: dict[str, Any] = field(default_factory=dict)   # small results one section hands another

    def step(self, section: str, name: str, needs: float, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` if ``needs`` seconds (full size; tiny runs always fit) are left; an exception is
        recorded and ``None`` returned, so one failing step never loses the others."""
        if self.profile.full and not self.deadline.allows(needs):
            self.report.detail(section, f"skipped:{name}",
                               f"needs ~{needs:.0f} s, {self.deadline.left():.0f} s left")
            print(f"[skip] {section}/{name}: needs ~{needs:.0f} s, {self.deadline.left():.0f} s left", flush=True)
            return None
        print(f"[step] {section}/{name} at {self.deadline.elapsed():.0f} s", flush=True)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark step may fail in any library; record and go on
            self.report.error(f"{section}/{name}", exc)
            return None
        finally:
            self.report.save()

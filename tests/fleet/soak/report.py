"""The soak's table: the seed, what ran, every fault injected, the invariants, and each violation's evidence."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .injector import Injector
from .invariants import Verdict
from .plan import FAULT_WEIGHTS, SoakConfig
from .producer import SoakJob

SHOWN_VIOLATIONS = 25


def render(config: SoakConfig, jobs: dict[str, SoakJob], injector: Injector, rest_faults: dict[str, int],
           verdict: Verdict, programs: dict[str, dict], out_dir: Path | None, all_violations: bool = False) -> str:
    queues = Counter(j.queue.split("_")[0] for j in jobs.values())
    vias = Counter(j.via for j in jobs.values())
    behaviours = Counter(j.behaviour for j in jobs.values())
    done, skipped = injector.counts(), injector.skipped()
    seed_note = "given" if config.seed_was_given else "random"
    lines = [
        f"==== soak: seed {config.seed} ({seed_note}; SOAK_SEED={config.seed} repeats the schedule), "
        f"{config.minutes:g} min, {len(jobs)} jobs ====",
        "jobs      " + "  ".join(f"{q} {n}" for q, n in sorted(queues.items()))
        + " | pushed over " + ", ".join(f"{v} {n}" for v, n in sorted(vias.items()))
        + " | " + " ".join(f"{b} {n}" for b, n in sorted(behaviours.items())),
        "faults    injected  skipped",
    ]
    for kind in [*FAULT_WEIGHTS, "pod_joined", "pod_left"]:
        lines.append(f"  {kind:<22}{done[kind]:>5}{skipped[kind]:>9}")
    lines.append(f"  {'upstash REST front':<22}{rest_faults.get('requests', 0):>5} requests: "
                 + ", ".join(f"{k} {rest_faults.get(k, 0)}" for k in ("drop", "lose", "hold")))
    lines.append("outcomes  (job told to → its first terminal callback)")
    for behaviour in sorted({b for b, _ in verdict.outcomes}):
        lines.append(f"  {behaviour:<6}" + ", ".join(f"{o} {n}" for (b, o), n in sorted(verdict.outcomes.items())
                                                   if b == behaviour))
    lines.append("invariants")
    for check in verdict.checks:
        mark = {True: " ok ", False: "FAIL", None: "info"}[check.ok]
        lines.append(f"  [{mark}] {check.name:<46} {check.summary}")
    lines.append("programs  " + "; ".join(f"{pod}: " + ", ".join(
        f"{name} {p['state']} (restarts {p.get('restarts', '?')})" for name, p in progs.items()
        if name in ("sdxl", "chat", "wan")) for pod, progs in programs.items()))
    shown = verdict.violations if all_violations else verdict.violations[:SHOWN_VIOLATIONS]
    if verdict.violations:
        where = f" (all in {out_dir / 'report.txt'})" if out_dir and not all_violations else ""
        lines.append(f"violations: {len(verdict.violations)}, {len(shown)} shown{where}")
        for violation in shown:
            lines.append(f"  {violation.kind}: {violation.job_id}: {violation.summary}")
            lines += [f"      {e}" for e in violation.evidence]
    if verdict.slow:
        lines.append(f"slow jobs (informational): {len(verdict.slow)}")
        for violation in (verdict.slow if all_violations else verdict.slow[:5]):
            lines.append(f"  {violation.job_id}: {violation.summary}")
            lines += [f"      {e}" for e in violation.evidence]
    lines.append("fault timeline")
    lines += [f"  {e.at:7.1f} s  {e.kind:<18} {e.detail}" for e in injector.events]
    return "\n".join(lines)


def write(out_dir: Path, text: str, verdict: Verdict, config: SoakConfig) -> None:
    """``report.txt`` (every violation) and ``report.json`` (the same, for a script) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text(text + "\n")
    (out_dir / "report.json").write_text(json.dumps({
        "seed": config.seed, "minutes": config.minutes,
        "outcomes": [{"behaviour": b, "outcome": o, "jobs": n} for (b, o), n in verdict.outcomes.items()],
        "checks": [asdict(c) for c in verdict.checks], "violations": [asdict(v) for v in verdict.violations],
        "slow": [asdict(v) for v in verdict.slow],
    }, indent=1))

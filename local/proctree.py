"""A process and its descendants, remembered as they appear, for harnesses that must leave nothing running
(tests/fleet, bench/fleet)."""
from __future__ import annotations

import psutil


def tree(pid: int | None, seen: dict[int, psutil.Process]) -> list[psutil.Process]:
    """``pid`` and all its descendants now (each remembered in ``seen``); [] once it is gone."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        found = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for process in found:
        seen.setdefault(process.pid, process)
    return found


def survivors(seen: dict[int, psutil.Process]) -> list[psutil.Process]:
    """Processes ever seen that still run; a zombie counts as gone."""
    alive = []
    for process in seen.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive

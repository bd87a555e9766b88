"""Fixtures for the orchestrator tests (helpers live in tests/orchestrator/support.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from local.net import free_port


@pytest.fixture
def events(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


@pytest.fixture
def ports() -> dict[str, int]:
    names = ("memory_manager", "router", "sdxl", "chat", "wan", "status")
    chosen: dict[str, int] = {}
    while len(set(chosen.values())) < len(names):
        chosen = {n: free_port() for n in names}
    return chosen

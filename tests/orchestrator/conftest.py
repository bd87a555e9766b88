"""Fixtures for the orchestrator tests (helpers live in tests/orchestrator/support.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from .support import free_ports


@pytest.fixture
def events(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


@pytest.fixture
def ports() -> dict[str, int]:
    return free_ports()

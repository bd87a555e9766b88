"""Fixtures for the registration tests: the chat worker and the router as switchable loopback services."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.orchestrator.support import free_ports

from .support import FakeService


@pytest.fixture
def ports() -> dict[str, int]:
    return free_ports()


@pytest.fixture
def services() -> Iterator[dict[str, FakeService]]:
    made = {"chat": FakeService(), "router": FakeService()}
    yield made
    for service in made.values():
        service.server.stop()

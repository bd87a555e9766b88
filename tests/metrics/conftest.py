"""Fixtures of the metrics tests: worker processes a test started (killed at the end), the runtime's
environment on the real Redis and the Supabase stand-in."""
import pytest

from tests.procs import runtime_env


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture
def env(redis_server, redis_client, supabase_standin, tmp_path):
    return runtime_env(redis_server.url, supabase_standin, tmp_path / "storage")

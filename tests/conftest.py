"""Shared fixtures: real local stand-ins for Redis, Upstash REST and Supabase (all on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from local.demo_models import build as build_demo_models
from local.redis_server import RedisServer
from local.supabase_standin import SupabaseStandin
from local.upstash_front import UpstashFront
from tests.procs import runtime_env

UPSTASH_TEST_TOKEN = "test-upstash-token"
SUPABASE_TEST_SERVICE_KEY = "test-service-key"
SUPABASE_TEST_CALLBACK_SECRET = "test-callback-secret"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session (no persistence); use ``redis_client`` for a clean DB."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A redis-py client (bytes replies) on an emptied database."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def upstash_front(redis_server: RedisServer) -> Iterator[UpstashFront]:
    """Upstash-REST front over ``redis_server``; ``.url`` / ``.token`` as UPSTASH_REDIS_REST_URL / _TOKEN."""
    front = UpstashFront(redis_server.url, UPSTASH_TEST_TOKEN)
    yield front
    front.stop()


@pytest.fixture
def supabase_standin() -> Iterator[SupabaseStandin]:
    """A fresh Supabase stand-in per test (callbacks, storage, registration)."""
    standin = SupabaseStandin(SUPABASE_TEST_SERVICE_KEY, SUPABASE_TEST_CALLBACK_SECRET)
    yield standin
    standin.stop()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict:
    """The tiny demo models (every family), built once per test session: ``local.demo_models.build``."""
    return build_demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture
def procs():
    """Worker processes a test started (``tests.procs.WorkerProcess``), killed at the end."""
    started = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture
def env(redis_server, redis_client, supabase_standin, tmp_path):
    """The job runtime's environment on the real Redis and the Supabase stand-in (storage in ``tmp_path``)."""
    return runtime_env(redis_server.url, supabase_standin, tmp_path / "storage")

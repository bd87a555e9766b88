import pytest

from tests.procs import runtime_env
from workers.core.transport import RedisProtocolTransport, UpstashRestTransport


@pytest.fixture(params=["redis", "upstash"])
def transport(request, redis_client, redis_server, upstash_front):
    """Both transports against the same real (emptied) Redis."""
    if request.param == "redis":
        t = RedisProtocolTransport(redis_server.url, timeout=5)
    else:
        t = UpstashRestTransport(upstash_front.url, upstash_front.token, timeout=5)
    yield t
    t.close()


@pytest.fixture
def procs():
    """Worker processes a test started (``tests.procs.WorkerProcess``), killed at the end."""
    started = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture
def env(redis_server, redis_client, supabase_standin, tmp_path):
    return runtime_env(redis_server.url, supabase_standin, tmp_path / "storage")

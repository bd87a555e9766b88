import pytest

from tests.core.rig import Rig
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
def rig(redis_server, redis_client, supabase_standin, tmp_path):
    """A job runtime on the session's Redis (flushed) and Supabase stand-in, storing under ``tmp_path``."""
    built = Rig(redis_server.url, supabase_standin, tmp_path / "storage")
    yield built
    built.close()

import pytest

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

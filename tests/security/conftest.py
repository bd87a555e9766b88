"""Two real fleets for the security tests, started once for tests/security (in parallel, ~20 s on 2 cores) and
stopped after its last test, not at the end of the session (idle fleets take CPU the later tests need):

- ``fleet_a``: production-like — Redis protocol with a password, every key set, anonymous calls refused,
  ``REFERENCE_FAILURE_POLICY=fallback``, ``REFERENCE_ALLOW_HOSTS=127.0.0.1``, registration on (PUBLIC_BASE_URL).
- ``fleet_b``: the other answers — Upstash REST transport, ``ALLOW_ANONYMOUS_API=true``, ``WORKER_ADMIN_KEY``
  unset (control endpoints must refuse everything), ``REFERENCE_FAILURE_POLICY=fail``.

Both use the Supabase stand-in (callbacks checked for the service key and the HMAC signature) and the
reference hosts of :mod:`tests.security.fleet`. Everything listens on loopback only.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import redis

from local.redis_server import RedisServer
from local.supabase_standin import SupabaseStandin
from local.upstash_front import UpstashFront

from .fleet import SECRETS, Fleet, JobQueue, ReferenceHosts


@pytest.fixture(scope="package")
def standin() -> Iterator[SupabaseStandin]:
    with SupabaseStandin(SECRETS["SUPABASE_SERVICE_KEY"], SECRETS["JOB_CALLBACK_SECRET"]) as server:
        yield server


@pytest.fixture(scope="package")
def refs() -> Iterator[ReferenceHosts]:
    hosts = ReferenceHosts()
    yield hosts
    hosts.stop()


def _locked_redis() -> tuple[RedisServer, str]:
    server = RedisServer()
    server.client().config_set("requirepass", SECRETS["REDIS_PASSWORD"])
    return server, f"redis://:{SECRETS['REDIS_PASSWORD']}@127.0.0.1:{server.port}/0"


@pytest.fixture(scope="package")
def fleets(tmp_path_factory, demo_models, standin, refs) -> Iterator[dict[str, Fleet]]:
    redis_a, url_a = _locked_redis()
    redis_b, url_b = _locked_redis()
    front = UpstashFront(url_b, SECRETS["UPSTASH_REDIS_REST_TOKEN"])
    root = tmp_path_factory.mktemp("security-fleets")
    started = {
        "a": Fleet("a", root / "a", demo_models, url_a, standin, PUBLIC_BASE_URL="http://127.0.0.1"),
        "b": Fleet("b", root / "b", demo_models, url_b, standin, upstash=front, ALLOW_ANONYMOUS_API="true",
                   WORKER_ADMIN_KEY=None, REFERENCE_FAILURE_POLICY="fail"),
    }
    started["a"].queue = JobQueue(client=redis.Redis.from_url(url_a))
    started["b"].queue = JobQueue(upstash=front)
    try:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(f.wait_ready) for f in started.values()]:
                future.result()
        yield started
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Fleet.stop, started.values()))
        front.stop()
        redis_a.close()
        redis_b.close()


@pytest.fixture(scope="package")
def fleet_a(fleets) -> Fleet:
    return fleets["a"]


@pytest.fixture(scope="package")
def fleet_b(fleets) -> Fleet:
    return fleets["b"]

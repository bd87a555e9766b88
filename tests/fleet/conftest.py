"""Fixtures that run the WHOLE fleet under ``python -m orchestrator`` on free loopback ports, against a real
redis-server, the Supabase stand-in (callbacks and Storage, reached through :class:`SupabaseFront`) and either
the fast fake handler in the real worker processes or the tiny demo models.

- ``fake_fleet`` (package): memory manager, router, and the sdxl/chat/wan worker processes with the fake
  handler; Redis with an append-only file fsynced on every write (on /dev/shm when it exists, so the fsyncs
  are cheap and a SIGKILLed redis-server still finds its file); storage = Supabase Storage on the stand-in.
- ``model_fleet`` (package): the same fleet with the real handlers on the tiny demo models.

Both are stopped once the last test of tests/fleet has run, not at the end of the session: an idle fleet keeps
polling Redis and checking health, CPU that the rest of the suite needs on a two-core machine.

A ``report`` fixture prints measured numbers to the terminal even without ``-s`` and records them as
junit properties.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from local.redis_server import RedisServer
from local.supabase_standin import SupabaseStandin

from .faults import SupabaseFront, TinyTmp
from .fleet import Fleet, base_env, fake_worker_commands, free_ports

SERVICE_KEY, CALLBACK_SECRET = "fleet-service-key", "fleet-callback-secret"
CLIENT_KEY, ADMIN_KEY = "fleet-client-key", "fleet-admin-key"


@dataclass
class Rig:
    fleet: Fleet
    redis: RedisServer
    client: Redis
    standin: SupabaseStandin
    front: SupabaseFront
    tmp: Path


def shared_memory_dir() -> Path | None:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="fleet-redis-", dir=shm)) if shm.is_dir() else None


def rig_env(redis_server: RedisServer, front: SupabaseFront, ports: dict[str, int], tmp: Path,
            **extra: str) -> dict[str, str]:
    return base_env(ports, tmp / "logs", REDIS_URL=redis_server.url, SUPABASE_URL=front.url,
                    SUPABASE_SERVICE_KEY=SERVICE_KEY, JOB_CALLBACK_SECRET=CALLBACK_SECRET,
                    WAN_WORKER_API_KEY=CLIENT_KEY, CHAT_WORKER_API_KEY=CLIENT_KEY, WORKER_ADMIN_KEY=ADMIN_KEY,
                    **extra)


def _start_rig(tmp_path_factory, name: str, persistence: bool, extra: dict[str, str]) -> tuple[Rig, Callable]:
    tmp = tmp_path_factory.mktemp(name)
    server = RedisServer(persistence=persistence, data_dir=shared_memory_dir() if persistence else None)
    standin = SupabaseStandin(SERVICE_KEY, CALLBACK_SECRET)
    front = SupabaseFront(standin.url)
    fleet = Fleet(rig_env(server, front, free_ports(), tmp, **extra), tmp / "fleet.log")
    rig = Rig(fleet, server, server.client(), standin, front, tmp)

    def close() -> list[int]:
        leftovers = []
        for each in {id(f): f for f in (fleet, rig.fleet)}.values():  # a test may have started a new one
            each.stop()
            leftovers += each.kill_leftovers()
        rig.client.close()
        front.stop()
        standin.stop()
        data_dir = server.data_dir
        server.close()
        if persistence:
            shutil.rmtree(data_dir, ignore_errors=True)
        return leftovers

    try:
        fleet.start()
    except BaseException:
        close()
        raise
    return rig, close


def fake_fleet_env(tmp: Path) -> dict[str, str]:
    dummy = str(tmp)  # the fake handler loads nothing, but the orchestrator skips a worker without a model path
    return {**fake_worker_commands(), "SDXL_MODEL_PATH": dummy, "WAN_MODEL_PATH": dummy,
            "QWEN_INSTRUCT_PATH": dummy, "CALLBACK_TIMEOUT_SECONDS": "3"}


@pytest.fixture(scope="package")
def fake_fleet(tmp_path_factory) -> Iterator[Rig]:
    """Uploads back off from 0.1 s instead of 1 s: the storage-fault test spends its 500s in 3 attempts of
    4 tries each, the same tries in a tenth of the time. Terminal callbacks back off from 0.5 s instead of 1 s
    (0.5, 1, 2, 4, 8 s), which halves the callback-outage test. Heartbeats live 2 s (the least allowed; 3 s in
    ``base_env``), so a killed worker's job is reaped about 2 s sooner: the poison job needs three reaps. The
    soak's fleets keep their own settings."""
    rig, close = _start_rig(tmp_path_factory, "fake-fleet", True,
                            {**fake_fleet_env(tmp_path_factory.mktemp("no-models")),
                             "STORAGE_RETRY_FIRST_SECONDS": "0.1", "CALLBACK_RETRY_FIRST_SECONDS": "0.5",
                             "WORKER_HEARTBEAT_TTL_SECONDS": "2"})
    yield rig
    leftovers = close()
    assert not leftovers, f"processes outlived the orchestrator: {leftovers}"


@pytest.fixture
def lone_fake_fleet(tmp_path_factory) -> Iterator[Rig]:
    """A fake fleet of its own, for a test that kills the orchestrator (workers hand a job back after 1 s)."""
    rig, close = _start_rig(tmp_path_factory, "lone-fleet", False,
                            {**fake_fleet_env(tmp_path_factory.mktemp("no-models")), "WORKER_STOP_GRACE_SECONDS": "1"})
    yield rig
    leftovers = close()
    assert not leftovers, f"processes outlived the orchestrator: {leftovers}"


@pytest.fixture(scope="package")
def tiny_tmp(tmp_path_factory) -> Iterator[TinyTmp]:
    tmp = TinyTmp(tmp_path_factory.mktemp("tiny-tmp"))
    yield tmp
    tmp.close()


@pytest.fixture(scope="package")
def model_fleet(tmp_path_factory, demo_models, tiny_tmp) -> Iterator[Rig]:
    """Real handlers on tiny models. WAN fails a job whose reference cannot be fetched
    (REFERENCE_FAILURE_POLICY=fail) and writes its temporary files into ``tiny_tmp``; SDXL keeps the default
    policy (fallback, reported)."""
    m = demo_models
    extra = {
        "SDXL_MODEL_PATH": str(m["sdxl_single_file"]), "SDXL_CONFIG_PATH": str(m["sdxl"]),
        "WAN_MODEL_PATH": str(m["wan"]), "WAN_VACE_MODEL_PATH": str(m["wan_vace"]),
        "QWEN_INSTRUCT_PATH": str(m["qwen_instruct"]), "QWEN_BASE_PATH": str(m["qwen_base"]),
        "REFERENCE_ALLOW_HOSTS": "127.0.0.1", "REFERENCE_TIMEOUT_SECONDS": "1", "REFERENCE_FAILURE_POLICY": "fail",
        "FLEET_COMMAND_SDXL": "env REFERENCE_FAILURE_POLICY=fallback {python} -m workers sdxl --port {port}",
        "FLEET_COMMAND_WAN": tiny_tmp.wrap("{python} -m workers wan --port {port}"),
        "CHAT_MAX_BATCH": "32", "FLEET_START_TIMEOUTS": "sdxl:300,chat:300,wan:300",
    }
    rig, close = _start_rig(tmp_path_factory, "model-fleet", False, extra)
    yield rig
    leftovers = close()
    assert not leftovers, f"processes outlived the orchestrator: {leftovers}"


@pytest.fixture
def report(capsys, record_property) -> Callable[..., None]:
    """``report(title, line, **numbers)``: to the terminal (even without ``-s``) and as junit properties."""
    def emit(title: str, line: str, **numbers: float) -> None:
        for name, value in numbers.items():
            record_property(name, value)
        text = f"[fleet] {title}: {line}"
        print(text)
        with capsys.disabled():
            sys.stdout.write(f"\n{text}\n")
            sys.stdout.flush()
    return emit

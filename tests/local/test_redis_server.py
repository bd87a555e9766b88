"""The real redis-server stand-in: start, stop, kill, restart with and without persistence."""

from __future__ import annotations

import socket

import pytest
import redis

from local.net import free_port
from local.redis_server import RedisServer


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_start_answers_ping_on_loopback_url() -> None:
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.running and server.pid
        assert server.client().ping()
    assert not server.running
    assert not server.data_dir.exists()


def test_kill_then_restart_with_persistence_keeps_data_on_same_port() -> None:
    with RedisServer(persistence=True) as server:
        port, data_dir = server.port, server.data_dir
        client = server.client()
        client.rpush("sdxl_queue", b'{"id": "a"}', b'{"id": "b"}')
        client.set("k", "v")
        server.kill()
        assert not server.running
        with pytest.raises(redis.exceptions.ConnectionError):
            server.client(socket_connect_timeout=1).ping()
        server.restart()
        assert (server.port, server.data_dir) == (port, data_dir)
        client = server.client()
        assert client.lrange("sdxl_queue", 0, -1) == [b'{"id": "a"}', b'{"id": "b"}']
        assert client.get("k") == b"v"


def test_graceful_stop_and_restart_without_persistence_loses_data() -> None:
    with RedisServer() as server:
        server.client().set("k", "v")
        server.stop()
        assert not server.running
        server.restart()
        assert server.client().get("k") is None


def test_fixed_port_and_restart_while_running() -> None:
    port = free_port()
    with RedisServer(port) as server:
        pid = server.pid
        server.restart()
        assert server.port == port and server.pid != pid
        assert server.client().ping()

"""A real ``redis-server`` (Debian's package) run as a subprocess on a free loopback port.

Used by the tests and the local demo: the queue code runs against real Redis semantics, not a mock.

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)

With ``persistence=True`` the server writes an append-only file with ``appendfsync always`` into its
directory, so :meth:`RedisServer.kill` (SIGKILL) followed by :meth:`RedisServer.restart` keeps every
acknowledged write: that is how the tests simulate a Redis crash.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from local.net import LOOPBACK, free_port


class RedisServerError(RuntimeError):
    """The redis-server binary is missing, or the server did not start or answer PING in time."""


def find_redis_server() -> str:
    """Return the path of ``redis-server`` on PATH, or raise :class:`RedisServerError` saying how to get it."""
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerError(
            "redis-server not found on PATH: install Debian's package (apt-get install redis-server) "
            "or put a redis-server binary on PATH"
        )
    return path


def _terminate(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Finalizer: never leave a redis-server behind when its owner is garbage-collected or at exit."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1.

    Args:
        port: fixed port, or ``None`` for a free one (chosen once; :meth:`restart` reuses it).
        persistence: append-only file with fsync on every write (survives SIGKILL); otherwise no
            persistence at all (``--save ""``, ``--appendonly no``).
        data_dir: working directory (``--dir``); ``None`` creates a temporary one, removed by :meth:`close`.
        startup_timeout: seconds to wait for PING to answer.
        start: start immediately (the default).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = False,
        data_dir: Path | None = None,
        startup_timeout: float = 10.0,
        start: bool = True,
    ) -> None:
        self.binary: str = find_redis_server()
        self.persistence = persistence
        self.startup_timeout = startup_timeout
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self._owns_dir = data_dir is None
        self.data_dir: Path = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="redis-"))
        self._proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self._finalizer: weakref.finalize | None = None
        if start:
            self.start()

    # ----------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, if any."""
        return self._proc.pid if self.running and self._proc is not None else None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (``decode_responses`` etc. passed through)."""
        return redis.Redis.from_url(self.url, **kwargs)

    # ----------------------------------------------------------------- lifecycle
    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.persistence:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd

    def start(self) -> RedisServer:
        """Start the server (if not running) and wait until PING answers."""
        if self.running:
            return self
        attempts = 1 if self._fixed_port or self._proc is not None else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError:
                # A free port can be taken between choosing and binding: choose again, unless fixed.
                if attempt + 1 == attempts:
                    raise
                self.port = free_port()
        return self

    def _spawn_and_wait(self) -> None:
        self._proc = subprocess.Popen(
            self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._finalizer = weakref.finalize(self, _terminate, self._proc)
        deadline = time.monotonic() + self.startup_timeout
        probe = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RedisServerError(f"redis-server exited with {self._proc.returncode}: {self._log_tail()}")
                try:
                    if probe.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                time.sleep(0.02)
        finally:
            probe.close()
        self.kill()
        raise RedisServerError(f"redis-server did not answer PING within {self.startup_timeout}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        parts: list[str] = []
        if self._proc is not None and self._proc.stderr is not None and self._proc.poll() is not None:
            parts.append(self._proc.stderr.read().decode(errors="replace"))
        log = self.data_dir / "redis.log"
        if log.exists():
            parts.append(log.read_text(errors="replace"))
        return " | ".join(p.strip()[-1000:] for p in parts if p.strip()) or "(no output)"

    def _reap(self, timeout: float) -> None:
        assert self._proc is not None
        try:
            self._proc.wait(timeout=timeout)
        finally:
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            if self._finalizer is not None:
                self._finalizer.detach()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: Redis flushes the AOF and exits); SIGKILL if it takes too long."""
        if not self.running or self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._reap(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as in a crash: only what was already fsynced survives."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.kill()
        self._reap(5.0)

    def restart(self) -> RedisServer:
        """Stop (gracefully) if running, then start again on the same port and directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, persistence={self.persistence}, {state})"

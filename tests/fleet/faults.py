"""Fault injectors that live outside the code under test.

- :class:`SupabaseFront`: the fleet's ``SUPABASE_URL``. It forwards every request to the Supabase stand-in,
  except that the ``job-callback`` path can be switched to answer 503 (``REFUSE``), to hold each request
  without ever answering or forwarding it (``HANG``: the caller's read timeout fires), or to forward it (the
  app has the callback) and then hold the answer (``LATE``: the caller's read timeout fires, so it cannot
  know the callback arrived), or to forward each one only after a delay (``SLOW``: a slow app, answered within
  the caller's timeout), until switched back. Every forwarded callback is kept as an :class:`Exchange`
  (body, when it came, when and how it was answered), so a checker can tell a callback sent again because its
  answer never came back (at-least-once) from one sent again after it was acknowledged (a duplicate). With
  ``identify_senders`` it also records which process sent each one (a scan of /proc per callback: the soak
  needs it, the other fleet tests would only pay for it).
- :class:`ReplyDelayProxy`: a TCP proxy on loopback in front of redis-server for the workers that speak the
  Redis protocol. ``hold(seconds)`` withholds every reply the server sends during the window (commands still
  reach the server and run): a network stall or a fork pause on the way back, which outlasts the client's
  socket timeout; the client gives up and closes, and the replies it never read are dropped.
- :class:`TinyTmp`: a temporary-files directory that is (nearly) full: a tiny tmpfs when this process may
  mount one (root with CAP_SYS_ADMIN), else ``RLIMIT_FSIZE`` on the worker through ``tests.fleet.fsize``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import urllib3
from flask import Flask, Response, request

from local.net import LOOPBACK, BackgroundServer

CALLBACK_PATH = "functions/v1/job-callback"
NOT_FORWARDED = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class Mode(str, Enum):
    PASS = "pass"
    REFUSE = "refuse"   # 503 at once
    HANG = "hang"       # accept, never answer (until the mode changes; then 504 to a caller long gone)
    LATE = "late"       # forward (the app records it), answer only once the mode changes: the answer is lost
    SLOW = "slow"       # forward after ``delay`` seconds (a slow app, still within the caller's timeout)


@dataclass(frozen=True)
class Exchange:
    """One job-callback POST that reached the app: its exact body, when it arrived and when (and with what
    status) the front answered it (``time.time()``), and the pid of the process that sent it (an outbox
    sender in any worker process may send a callback another worker wrote; None unless the front identifies
    senders)."""
    body: bytes
    arrived: float
    answered: float
    status: int
    sender_pid: int | None = None

    def acknowledged(self, client_timeout: float) -> bool:
        """Whether the caller got a 2xx before its read timeout: it knew the callback was delivered."""
        return 200 <= self.status < 300 and self.answered - self.arrived < client_timeout


class SupabaseFront(BackgroundServer):
    def __init__(self, upstream: str, identify_senders: bool = False):
        self.upstream = upstream.rstrip("/")
        self.identify_senders = identify_senders
        self.mode = Mode.PASS
        self.delay = 0.0
        self.refused = 0
        self.hung = 0
        self.late = 0
        self.exchanges: list[Exchange] = []
        self._senders: list[tuple[float, str]] = []    # (time.monotonic(), worker_id) of terminal callbacks
        self._changed = threading.Condition()
        self._http = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=5, read=60))
        app = Flask("supabase-front")

        @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE"])
        def forward(path: str) -> Response:
            arrived, late = time.time(), False
            sender_pid = None
            if path == CALLBACK_PATH:
                self._note_sender(request.get_data())
                if self.identify_senders:
                    sender_pid = client_pid(int(request.environ.get("REMOTE_PORT") or 0))
                with self._changed:
                    mode = self.mode
                    if mode is Mode.REFUSE:
                        self.refused += 1
                        return Response('{"error":"injected outage"}', 503, mimetype="application/json")
                    if mode is Mode.HANG:
                        self.hung += 1
                        self._changed.wait_for(lambda: self.mode is not Mode.HANG, timeout=600)
                        return Response('{"error":"held"}', 504, mimetype="application/json")
                    if mode is Mode.LATE:
                        self.late += 1
                        late = True
                    delay = self.delay if mode is Mode.SLOW else 0.0
                if delay:
                    time.sleep(delay)
            url = f"{self.upstream}/{path}"
            if request.query_string:
                url += "?" + request.query_string.decode("latin-1")
            headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
            body = request.get_data()
            answer = self._http.request(request.method, url, body=body, headers=headers)
            if late:
                with self._changed:
                    self._changed.wait_for(lambda: self.mode is not Mode.LATE, timeout=600)
            if path == CALLBACK_PATH:
                with self._changed:
                    self.exchanges.append(Exchange(body, arrived, time.time(), answer.status, sender_pid))
            return Response(answer.data, answer.status, content_type=answer.headers.get("Content-Type"))

        super().__init__(app, name="supabase-front")

    def _note_sender(self, body: bytes) -> None:
        try:
            sent = json.loads(body)
        except ValueError:
            return
        if isinstance(sent, dict) and sent.get("status") in ("completed", "failed"):
            with self._changed:
                self._senders.append((time.monotonic(), str(sent.get("worker_id"))))
                del self._senders[:-200]

    def terminal_senders(self, within: float) -> set[str]:
        """Worker ids that POSTed a terminal callback (in any mode) in the last ``within`` seconds: in an
        outage, the workers now inside their callback delivery."""
        since = time.monotonic() - within
        with self._changed:
            return {worker for at, worker in self._senders if at >= since}

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        """Switch the job-callback path to ``mode`` (``delay``: seconds before forwarding, ``SLOW`` only)."""
        with self._changed:
            self.mode, self.delay = mode, delay
            self._changed.notify_all()

    def stop(self) -> None:
        self.set_mode(Mode.PASS)
        super().stop()


def client_pid(port: int) -> int | None:
    """The pid of the local process whose TCP socket (IPv4, loopback) has source port ``port``: its inode from
    /proc/net/tcp, then the process holding that socket among /proc/*/fd. None if it is gone or not visible."""
    suffix = f":{port:04X}"
    try:
        with open("/proc/net/tcp") as table:
            inode = next((f[9] for f in map(str.split, table)
                          if len(f) > 9 and f[1].endswith(suffix) and f[9] != "0"), None)   # 0: TIME_WAIT
    except OSError:
        return None
    if inode is None:
        return None
    socket_link = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == socket_link for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


class ReplyDelayProxy:
    """Loopback TCP proxy to ``127.0.0.1:upstream_port``; ``hold(seconds)`` delays server→client bytes."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.held = 0                  # reply chunks withheld by a window (delivered late or dropped)
        self._until = 0.0
        self._changed = threading.Condition()
        self._sockets: set[socket.socket] = set()
        self._open = True
        threading.Thread(target=self._accept, name="reply-delay-proxy", daemon=True).start()

    def hold(self, seconds: float) -> None:
        """Withhold replies for ``seconds`` from now (returns at once)."""
        with self._changed:
            self._until = time.monotonic() + seconds

    def release(self) -> None:
        with self._changed:
            self._until = 0.0
            self._changed.notify_all()

    def _accept(self) -> None:
        while self._open:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()   # Redis is down: the client sees its connection closed, as with Redis itself
                continue
            self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if replies:
                    self._wait_out_the_window()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
                self._sockets.discard(sock)

    def _wait_out_the_window(self) -> None:
        with self._changed:
            if time.monotonic() < self._until:
                self.held += 1
            while (left := self._until - time.monotonic()) > 0:
                self._changed.wait(left)

    def stop(self) -> None:
        self._open = False
        self.release()
        self._listener.close()
        for sock in list(self._sockets):
            _close(sock)


def _close(sock: socket.socket) -> None:
    """Shut down first: that wakes the other pump thread blocked in ``recv`` on the same socket."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class TinyTmp:
    """A temporary-files directory too small for a video. ``wrap(command)`` gives the worker command that
    uses it: ``env TMPDIR=<dir> ...`` on a tiny tmpfs, else ``... -m tests.fleet.fsize <bytes> -- ...``."""

    SIZE = 16 * 1024

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.mounted = self._mount()
        self.how = (f"a {self.SIZE // 1024} KiB tmpfs as TMPDIR" if self.mounted
                    else f"RLIMIT_FSIZE={self.SIZE} on the worker (tmpfs mount not permitted here)")

    def _mount(self) -> bool:
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.SIZE},mode=1777", "tmpfs",
                                     str(self.path)], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0

    def wrap(self, command: str) -> str:
        if self.mounted:
            return f"env TMPDIR={self.path} {command}"
        return f"{{python}} -m tests.fleet.fsize {self.SIZE} -- {command}"

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=10)
            self.mounted = False

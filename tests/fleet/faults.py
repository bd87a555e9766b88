"""Fault injectors that live outside the code under test.

- :class:`SupabaseFront`: the fleet's ``SUPABASE_URL``. It forwards every request to the Supabase stand-in,
  except that the ``job-callback`` path can be switched to answer 503 (``REFUSE``), to hold each request
  without ever answering or forwarding it (``HANG``: the caller's read timeout fires), or to forward it (the
  app has the callback) and then hold the answer (``LATE``: the caller's read timeout fires, so it cannot
  know the callback arrived), until switched back.
- :class:`TinyTmp`: a temporary-files directory that is (nearly) full: a tiny tmpfs when this process may
  mount one (root with CAP_SYS_ADMIN), else ``RLIMIT_FSIZE`` on the worker through ``tests.fleet.fsize``.
"""
from __future__ import annotations

import subprocess
import threading
from enum import Enum
from pathlib import Path

import urllib3
from flask import Flask, Response, request

from workers.local.net import BackgroundServer

CALLBACK_PATH = "functions/v1/job-callback"
NOT_FORWARDED = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class Mode(str, Enum):
    PASS = "pass"
    REFUSE = "refuse"   # 503 at once
    HANG = "hang"       # accept, never answer (until the mode changes; then 504 to a caller long gone)
    LATE = "late"       # forward (the app records it), answer only once the mode changes: the answer is lost


class SupabaseFront(BackgroundServer):
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.mode = Mode.PASS
        self.refused = 0
        self.hung = 0
        self.late = 0
        self._changed = threading.Condition()
        self._http = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=5, read=60))
        app = Flask("supabase-front")

        @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE"])
        def forward(path: str) -> Response:
            late = False
            if path == CALLBACK_PATH:
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
            url = f"{self.upstream}/{path}"
            if request.query_string:
                url += "?" + request.query_string.decode("latin-1")
            headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
            answer = self._http.request(request.method, url, body=request.get_data(), headers=headers)
            if late:
                with self._changed:
                    self._changed.wait_for(lambda: self.mode is not Mode.LATE, timeout=600)
            return Response(answer.data, answer.status, content_type=answer.headers.get("Content-Type"))

        super().__init__(app, name="supabase-front")

    def set_mode(self, mode: Mode) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def stop(self) -> None:
        self.set_mode(Mode.PASS)
        super().stop()


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

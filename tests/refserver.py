"""Loopback reference hosts for tests: a Flask server of images (good, missing, not-an-image, big, hanging,
redirects) and a raw ``DripServer`` that trickles its answer."""
from __future__ import annotations

import io
import socket
import threading
import time

from flask import Flask, Response, redirect, request
from PIL import Image

from local.net import BackgroundServer


def png_bytes(w: int = 48, h: int = 32, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), color).save(out, format="PNG")
    return out.getvalue()


def create_app() -> Flask:
    app = Flask("refserver")

    @app.get("/image.png")
    def image():
        return Response(png_bytes(), mimetype="image/png")

    @app.get("/missing.png")
    def missing():
        return Response("no", status=404)

    @app.get("/text.png")
    def text():
        return Response("this is not an image", mimetype="image/png")

    @app.get("/big.png")
    def big():
        return Response(b"\0" * (3 * 1024 * 1024), mimetype="image/png")

    @app.get("/hang.png")
    def hang():
        time.sleep(float(request.args.get("s", "30")))
        return Response(png_bytes(), mimetype="image/png")

    @app.get("/redirect")
    def go():
        return redirect(request.args["to"], code=302)

    return app


class ReferenceServer(BackgroundServer):
    def __init__(self) -> None:
        super().__init__(create_app(), name="refserver")


class DripServer:
    """A raw TCP server on 127.0.0.1 that answers every connection with ``head`` at once, then ``drip`` one
    byte every ``interval`` seconds, then closes (at the latest after ``lifetime`` seconds): a host that
    trickles a body, or its headers, slower than any per-read timeout but never stops. It reads the HTTP
    request first, unless ``read_request=False`` (a TLS client speaks first with a ClientHello)."""

    def __init__(self, head: bytes, drip: bytes = b"", interval: float = 1.0, lifetime: float = 10.0,
                 read_request: bool = True) -> None:
        self.head, self.drip, self.interval, self.lifetime = head, drip, interval, lifetime
        self.read_request = read_request
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="drip-server", daemon=True).start()

    def url(self, path: str = "/ref.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        ends = time.monotonic() + self.lifetime
        with conn:
            try:
                conn.settimeout(2)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                    if not self.read_request:
                        break
                conn.sendall(self.head)
                for i in range(len(self.drip)):
                    if self._stop.wait(self.interval) or time.monotonic() > ends:
                        return
                    conn.sendall(self.drip[i:i + 1])
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()

"""A loopback HTTP server of reference images for tests: good, missing, not-an-image, big, hanging, redirects."""
from __future__ import annotations

import io
import time

from flask import Flask, Response, redirect, request
from PIL import Image

from workers.local.net import BackgroundServer


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

"""The fake handler of tests/fakes plus ``POST /slow?seconds=S``: a request the app takes S seconds to answer,
like a long non-streaming chat generation, to load a worker's HTTP threads without a model."""
from __future__ import annotations

import os
import time
from typing import Any

from flask import request

from tests.fakes.handlers import FakeHandler
from workers.core.job import Queue
from common.settings import Settings


class SlowRouteHandler(FakeHandler):
    def register_routes(self, app: Any, service: Any) -> None:
        @app.post("/slow")
        def slow():
            time.sleep(min(float(request.args.get("seconds", "5")), 60.0))
            return {"success": True}


def create_handler(settings: Settings) -> SlowRouteHandler:
    return SlowRouteHandler(Queue(os.environ.get("FAKE_QUEUE", "sdxl_queue")))

"""The fake handler of tests/fakes plus ``POST /slow?seconds=S``: a request the app takes S seconds to answer,
like a long non-streaming chat generation, to load a worker's HTTP threads without a model."""
from __future__ import annotations

import os
import time

from flask import Blueprint, request

from common.settings import Settings
from tests.fakes.handlers import FakeHandler
from workers.core.job import Queue
from workers.core.residency import Residency


def create_handler(settings: Settings) -> FakeHandler:
    return FakeHandler(Queue(os.environ.get("FAKE_QUEUE", "sdxl_queue")))


def create_routes(handler: FakeHandler, residency: Residency) -> Blueprint:
    routes = Blueprint("slow", __name__)

    @routes.post("/slow")
    def slow():
        time.sleep(min(float(request.args.get("seconds", "5")), 60.0))
        return {"success": True}
    return routes

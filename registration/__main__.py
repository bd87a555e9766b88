"""``python -m registration [--port 7872]``: announce the chat worker and the router to the app (CONTRACT §6).

A process of its own under the orchestrator, like the router and the memory manager: it polls the services'
local ``/health`` (it is told nothing by the supervisor), registers each once it answers 200, re-registers
every ``REGISTRATION_INTERVAL_SECONDS`` and with method ``restart`` after an outage. It serves ``/health`` on
127.0.0.1 so the supervisor can gate and watch it; the loops run in gunicorn's worker process, beside the app.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from flask import Flask

from common.exit_codes import ExitCode
from common.http import check_health, create_base_app
from common.logs import setup_logging
from common.serving import serve

from .client import Service
from .config import RegistrationSettings
from .registrations import Registrations

HEALTH_TIMEOUT_SECONDS = 5.0  # the app's function allows a registered URL 5 s to answer /health


def build(config: RegistrationSettings) -> Flask:
    ports = config.ports
    registrations = Registrations(
        config, {Service.CHAT: ports["chat"], Service.ROUTER: ports["router"]},
        healthy=lambda url: check_health(url, timeout=HEALTH_TIMEOUT_SECONDS).ok,
        interval=config.interval_seconds, retry_max=config.retry_max_seconds,
        health_poll=config.health_poll_seconds)
    registrations.start()
    return create_base_app("registration", registrations.health)


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port between 1 and 65535")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m registration",
        description="Register the chat worker and the router with the app once their /health answers 200, "
                    "re-register every REGISTRATION_INTERVAL_SECONDS and after a restart. Serves /health.")
    parser.add_argument("--port", type=_port, help="health port on 127.0.0.1 (default REGISTRATION_PORT, 7872)")
    args = parser.parse_args(argv)
    config = RegistrationSettings.for_process(os.environ, "registration")
    setup_logging(logging.INFO, config.log_format, service="registration")
    serve(lambda: build(config), host="127.0.0.1", port=args.port or config.ports["registration"],
          threads=4, name="registration", read_timeout=config.http_read_timeout_seconds)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

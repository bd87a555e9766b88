"""``python -m router [--port 7860] [--host 0.0.0.0]``: the router under gunicorn (router/app.py says what it does)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from common.exit_codes import ExitCode
from common.logs import setup_logging
from common.serving import serve

from .app import HEALTH_PATHS, RouterDeps, create_app
from .config import RouterSettings
from .ops import collector_from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router",
                                     description="Route /sdxl/* to the SDXL worker and /wan/* to the WAN worker.")
    parser.add_argument("--port", type=int, help="listen port (default ROUTER_PORT, 7860)")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0: the public port)")
    args = parser.parse_args(argv)
    settings = RouterSettings.for_process(os.environ, "router")
    setup_logging(logging.INFO, settings.log_format, service="router")
    deps = RouterDeps(backends={"sdxl": settings.url("sdxl"), "wan": settings.url("wan")},
                      timeout=settings.timeout_seconds, connect_timeout=settings.connect_timeout_seconds,
                      max_body=settings.max_body_bytes, admin_key=settings.worker_admin_key)

    def factory():
        # in gunicorn's worker process (no preload): the collector's thread runs where the app serves
        return create_app(replace(deps, collector=collector_from(settings).start()))

    serve(factory, host=args.host, port=args.port or settings.ports["router"],
          threads=settings.threads, name="router", read_timeout=settings.http_read_timeout_seconds,
          health_paths=HEALTH_PATHS)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

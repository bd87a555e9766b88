"""``python -m workers <kind> [--port N]``: one model worker process, served by gunicorn.

gunicorn runs one worker process with threads (gthread). The model, the job loop and the Flask app live in
that process: built in ``load()``, started in ``post_worker_init``. SIGTERM (to the arbiter) = warm stop:
the worker finishes its current job within the grace period, or hands it back. SIGINT/SIGQUIT = cold stop:
the current job goes back to the head of its queue at once.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable

from gunicorn.app.base import BaseApplication

from .core.errors import ConfigError
from .core.service import Service, default_worker_id
from .core.settings import Settings

KINDS = {"sdxl": 7859, "chat": 7861, "wan": 7862}
EXIT_CONFIG = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("kind", help="sdxl, chat or wan (or any name with --handler)")
    parser.add_argument("--port", type=int, help="HTTP port (default: sdxl 7859, chat 7861, wan 7862)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--slot", type=int, default=0, help="slot number, part of the worker id")
    parser.add_argument("--threads", type=int, default=32, help="HTTP threads")
    parser.add_argument("--grace", type=float, default=float(os.environ.get("WORKER_STOP_GRACE_SECONDS", 300)),
                        help="warm-stop grace in seconds before the current job is handed back")
    parser.add_argument("--handler", help="module:factory building the handler (tests); default workers.<kind>")
    return parser.parse_args(argv)


def handler_factory(args: argparse.Namespace) -> Callable:
    module_name, _, attr = (args.handler or f"workers.{args.kind}:create_handler").partition(":")
    return getattr(importlib.import_module(module_name), attr or "create_handler")


class WorkerApplication(BaseApplication):
    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args = args
        self.settings = settings
        self.service: Service | None = None
        super().__init__()

    def load_config(self) -> None:
        port = self.args.port or KINDS.get(self.args.kind, 7870)
        options = {
            "bind": f"{self.args.host}:{port}", "workers": 1, "worker_class": "gthread",
            "threads": self.args.threads, "timeout": 120, "graceful_timeout": int(self.args.grace + 15),
            "limit_request_line": 8190, "accesslog": None, "errorlog": "-", "loglevel": "info",
            "proc_name": f"worker-{self.args.kind}", "control_socket_disable": True,
            "post_worker_init": lambda worker: self.service.start(),
            "worker_int": lambda worker: self.service.stop_cold(),
            "worker_abort": lambda worker: self.service.stop_cold(),
            "worker_exit": lambda server, worker: self.service and self.service.stop_warm(self.args.grace),
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        handler = handler_factory(self.args)(self.settings)
        worker_id = default_worker_id(self.settings, self.args.kind, self.args.slot)
        self.service = Service(self.settings, handler, worker_id)
        return self.service.create_app()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s [{args.kind}] %(name)s: %(message)s")
    try:
        settings = Settings.from_env(os.environ)
        handler_factory(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ImportError, AttributeError) as exc:
        print(f"unknown worker kind {args.kind!r}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    WorkerApplication(args, settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m workers <kind> [--port N]``: one model worker process, served by gunicorn.

gunicorn runs one worker process with threads (gthread). The model, the job loop and the Flask app live in
that process: built in ``load()``, started in ``post_worker_init``. SIGTERM (to the arbiter) = warm stop:
the job loop stops taking jobs at once (before gunicorn's HTTP drain), the worker finishes its current job
within the grace period, or hands it back. SIGINT/SIGQUIT = cold stop: the current job goes back to the head
of its queue at once.

Exit status (``common.exit_codes``): a worker process that stops itself for a reason (a bad setting, a failed
model load, its circuit breaker, a fatal GPU error, the watchdog, a cold stop that handed a job back) writes
its code into a cell shared with the arbiter; the arbiter then stops instead of respawning it, and the whole
``python -m workers`` process exits with that code, so the orchestrator sees why. A worker process that dies
any other way (a crash, SIGKILL) is respawned by gunicorn as before.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import importlib
import logging
import multiprocessing.sharedctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from gunicorn.app.base import BaseApplication

from common.errors import ConfigError
from common.exit_codes import ExitCode
from common.logs import setup_logging
from common.serving import GunicornLogger, deadline_worker
from common.settings import Settings

from .core.service import Service, default_worker_id

KINDS = {"sdxl": 7859, "chat": 7861, "wan": 7862}
KIND_SETTINGS = {"sdxl": "workers.sdxl.settings:SdxlSettings", "chat": "workers.chat.settings:ChatSettings",
                 "wan": "workers.wan.settings:WanSettings"}
log = logging.getLogger("workers")


class ExitCell:
    """One int in memory shared by the arbiter and the worker processes it forks (created before the fork).

    gunicorn's ``child_exit`` hook is not told a worker's exit status, so the worker writes its code here just
    before ``os._exit``; the arbiter reads it when it reaps the worker."""

    def __init__(self) -> None:
        self._value = multiprocessing.sharedctypes.RawValue(ctypes.c_int, 0)

    def exit(self, code: int) -> NoReturn:
        self._value.value = int(code)
        logging.shutdown()
        os._exit(int(code))

    def take(self) -> int:
        code, self._value.value = self._value.value, 0
        return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("kind", help="sdxl, chat or wan (or any name with --handler)")
    parser.add_argument("--port", type=int, help="HTTP port (default: sdxl 7859, chat 7861, wan 7862)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--slot", type=int, default=0, help="slot number, part of the worker id")
    parser.add_argument("--threads", type=int, default=32, help="HTTP threads")
    parser.add_argument("--grace", type=float,
                        help="warm-stop grace in seconds before the current job is handed back "
                             "(default WORKER_STOP_GRACE_SECONDS, 300)")
    parser.add_argument("--handler", help="module:factory building the handler (tests); default workers.<kind>")
    return parser.parse_args(argv)


def settings_class(kind: str) -> type[Settings]:
    """A model kind's own settings (``workers/<kind>/settings.py``), so it parses only what it reads; any other
    kind (a test's handler) gets the runtime's."""
    if kind not in KIND_SETTINGS:
        return Settings
    module_name, _, name = KIND_SETTINGS[kind].partition(":")
    return getattr(importlib.import_module(module_name), name)


def handler_factory(args: argparse.Namespace) -> Callable:
    module_name, _, attr = (args.handler or f"workers.{args.kind}:create_handler").partition(":")
    return getattr(importlib.import_module(module_name), attr or "create_handler")


def routes_factory(args: argparse.Namespace) -> Callable | None:
    """The kind's own HTTP routes, ``create_routes(handler, residency)``, declared in the module of its handler
    factory; None when the kind has none (SDXL, the test handlers)."""
    module_name = (args.handler or f"workers.{args.kind}").partition(":")[0]
    return getattr(importlib.import_module(module_name), "create_routes", None)


class WorkerApplication(BaseApplication):
    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args = args
        self.settings = settings
        self.service: Service | None = None
        self.cell = ExitCell()
        self.exit_code = ExitCode.OK
        super().__init__()

    def load_config(self) -> None:
        port = self.args.port or KINDS.get(self.args.kind, 7870)
        options = {
            "bind": f"{self.args.host}:{port}", "workers": 1,
            "worker_class": deadline_worker(read_timeout=self.settings.http_read_timeout_seconds),
            "threads": self.args.threads, "timeout": 120, "graceful_timeout": int(self.args.grace + 15),
            "limit_request_line": 8190, "accesslog": None, "errorlog": "-", "loglevel": "info",
            "proc_name": f"worker-{self.args.kind}", "control_socket_disable": True, "logger_class": GunicornLogger,
            "post_worker_init": self.post_worker_init,
            "worker_int": lambda worker: self.service.stop_cold(),
            "worker_abort": lambda worker: self.service.stop_cold(),
            "worker_exit": lambda server, worker: self.service and self.service.after_http_drain(self.args.grace),
            "child_exit": self.child_exit, "on_exit": self.on_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        """In the worker process, after the fork: the id is drawn here, so every process has its own."""
        try:
            handler = handler_factory(self.args)(self.settings)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            self.cell.exit(ExitCode.CONFIG_ERROR)
        worker_id = default_worker_id(self.settings, self.args.kind, self.args.slot)
        create_routes = routes_factory(self.args)
        routes = functools.partial(create_routes, handler) if create_routes else None
        self.service = Service(self.settings, handler, worker_id, exit_process=self.cell.exit, routes=routes)
        return self.service.create_app()

    # -- gunicorn hooks: worker side -------------------------------------------------------------
    def post_worker_init(self, worker: Any) -> None:
        """Start the service, and put the job loop's stop in front of gunicorn's own SIGTERM handling: gthread
        only stops accepting and drains HTTP (up to the graceful timeout) before ``worker_exit`` runs."""
        self.service.start()
        drain = worker.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:
            self.service.begin_warm_stop(self.args.grace)
            drain(sig, frame)

        worker.handle_exit = handle_exit
        signal.signal(signal.SIGTERM, handle_exit)
        signal.siginterrupt(signal.SIGTERM, False)   # as gunicorn's init_signals: do not disturb requests

    # -- gunicorn hooks: arbiter side ------------------------------------------------------------
    def child_exit(self, arbiter: Any, worker: Any) -> None:
        """A worker that exited with a named code is not respawned: the arbiter stops (SIGTERM to itself, the
        documented graceful stop) and ``on_exit`` ends the process with that code."""
        code = self.cell.take()
        if not code:
            return
        self.exit_code = ExitCode(code)
        arbiter.log.error("worker exited with %d (%s): stopping", code, self.exit_code.name)
        arbiter.num_workers = 0   # no respawn in the same turn of the arbiter's loop
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exit(self, arbiter: Any) -> None:
        if self.exit_code:
            sys.exit(int(self.exit_code))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_class(args.kind).from_env(os.environ)
        handler_factory(args)
    except ConfigError as exc:
        print(f"workers: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except (ImportError, AttributeError) as exc:
        print(f"workers: unknown worker kind {args.kind!r}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if args.grace is None:
        args.grace = settings.stop_grace_seconds
    setup_logging(settings.log_level, settings.log_format, service=args.kind, stream=sys.stderr,
                  text_format=f"%(asctime)s %(levelname)s [{args.kind}] %(name)s: %(message)s")
    WorkerApplication(args, settings).run()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

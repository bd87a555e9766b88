"""``python -m orchestrator`` runs the fleet; ``python -m orchestrator status`` shows it.

The supervisor loop runs on the main thread (it spawns every child, see :mod:`orchestrator.child`); the
status server is a daemon thread. SIGTERM/SIGINT only set a flag. Registration is a program like the others
(``python -m registration``): the orchestrator imports no other process's code, it only launches commands.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping

from common.background import BackgroundServer
from common.errors import ConfigError
from common.exit_codes import ExitCode

from .checks import detect_gpus, startup_report
from .config import FleetSettings, StartupSettings
from .fleet import build_specs
from .logs import setup_logging
from .program import Backoff
from .reaper import become_subreaper
from .status import create_app, fetch, render
from .supervisor import Supervisor

log = logging.getLogger("orchestrator")


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description="Run or inspect the worker fleet.")
    parser.add_argument("command", nargs="?", choices=("run", "status"), default="run")
    parser.add_argument("--json", action="store_true", help="status: print the raw JSON document")
    args = parser.parse_args(argv)
    try:
        settings = StartupSettings.from_env(env)
        fleet = FleetSettings.from_env(env, python=sys.executable)
    except ConfigError as exc:
        print(f"orchestrator: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if args.command == "status":
        return show_status(fleet, args.json)
    return run(settings, fleet, env)


def show_status(fleet: FleetSettings, as_json: bool) -> int:
    status = fetch(fleet.status_port) if fleet.status_port else None
    if status is None:
        print(f"no orchestrator answers on 127.0.0.1:{fleet.status_port}", file=sys.stderr)
        return ExitCode.STATUS_UNAVAILABLE
    print(json.dumps(status, indent=2) if as_json else render(status))
    return ExitCode.OK


def gpu_count(fleet: FleetSettings, env: Mapping[str, str]) -> tuple[int, list]:
    if fleet.gpu_count is not None:
        return fleet.gpu_count, []
    gpus = detect_gpus()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return min(len(gpus), len([d for d in visible.split(",") if d.strip()])), gpus
    return len(gpus), gpus


def run(settings: StartupSettings, fleet: FleetSettings, env: Mapping[str, str]) -> int:
    log_file = setup_logging(fleet.log_dir, fleet.log_max_bytes, fleet.log_backups, fmt=fleet.log_format)
    log.info("orchestrator starting: pid %d, programs %s, log file %s", os.getpid(),
             ",".join(fleet.programs) or "none", log_file or "none")
    count, gpus = gpu_count(fleet, env)
    try:
        specs = build_specs(settings, fleet, env, count)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return ExitCode.CONFIG_ERROR
    startup_report(settings, [s.name for s in specs], gpus, count)
    if not specs:
        log.error("nothing to run")
        return ExitCode.NO_PROGRAMS

    adopt_orphans = become_subreaper() or os.getpid() == 1
    if not adopt_orphans:
        log.warning("cannot become a child subreaper: orphans of the fleet are left to init to reap")
    supervisor = Supervisor(
        specs, Backoff(fleet.backoff_base_seconds, fleet.backoff_max_seconds, fleet.max_quick_failures,
                       fleet.stable_seconds),
        stop_grace=fleet.stop_grace_seconds, kill_after=fleet.kill_after_seconds,
        health_interval=fleet.health_interval_seconds, unhealthy_restart_checks=fleet.unhealthy_restart_checks,
        adopt_orphans=adopt_orphans)

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        supervisor.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status_server = None
    if fleet.status_port:
        try:
            status_server = BackgroundServer(create_app(supervisor.status), fleet.status_port, name="status-server")
            log.info("status: http://127.0.0.1:%d/status (python -m orchestrator status)", status_server.port)
        except OSError as exc:
            log.warning("status: cannot listen on 127.0.0.1:%d (%s): no status page", fleet.status_port,
                        exc.strerror or type(exc).__name__)
    code = supervisor.run()
    if status_server is not None:
        status_server.stop()
    log.info("orchestrator exits with %d (%s)", code, code.name)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Serve a WSGI app with gunicorn in-process: one worker process, :class:`common.serving.DeadlineWorker`.

The app factory runs inside the gunicorn worker (no preload), so any thread the factory starts lives in the
process that serves the requests. ``threads`` bounds the requests the app runs at once; connections being read
and the ``health_paths`` do not count against it, and every request must arrive within ``read_timeout``
(common/serving.py says why). gunicorn ≥ 25.1 opens a control socket at a fixed per-user path by default;
several gunicorns on one pod would fight over it, so it is disabled.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from gunicorn.app.base import BaseApplication

from common.serving import deadline_worker


class _Gunicorn(BaseApplication):
    def __init__(self, factory: Callable[[], Any], options: dict[str, Any]):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


def serve(factory: Callable[[], Any], *, host: str, port: int, threads: int, name: str, read_timeout: float,
          health_paths: Iterable[str] = ("/health",), graceful_timeout: float = 30.0) -> None:
    """Run until SIGTERM (gunicorn's own graceful stop: in-flight requests finish, up to ``graceful_timeout``)."""
    _Gunicorn(factory, {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": deadline_worker(read_timeout=read_timeout, health_paths=health_paths),
        "threads": threads,
        "graceful_timeout": int(graceful_timeout),
        "timeout": 60,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": name,
        "preload_app": False,
        "control_socket_disable": True,
    }).run()

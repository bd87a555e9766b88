"""Orchestrator logging: one line per event, to stdout and a rotating file in ``LOG_DIR``.

Children's output arrives through the orchestrator (``<program> | <line>``), so the file holds the whole
fleet's log. Children log to their own stdout only. With ``LOG_FORMAT=json`` every line of both is one JSON
object (``common.logs``); a child's JSON line is kept as it is, with ``program`` added.
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from common.logs import configure

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_dir: Path, max_bytes: int, backups: int, level: int = logging.INFO,
                  fmt: str = "text") -> Path | None:
    """Configure the root logger; return the log file, or None when the directory cannot be used."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    path: Path | None = log_dir / "orchestrator.log"
    problem = None
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                             encoding="utf-8"))
    except OSError as exc:
        problem, path = exc.strerror or type(exc).__name__, None
    configure(handlers, level, fmt, "orchestrator", FORMAT)
    if problem is not None:
        logging.getLogger("orchestrator").warning("logs: cannot write to LOG_DIR (%s): stdout only", problem)
    for noisy in ("urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path

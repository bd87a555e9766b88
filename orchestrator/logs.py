"""Orchestrator logging: one line per event, to stdout and a rotating file in ``LOG_DIR``.

Children's output arrives through the orchestrator (``<program> | <line>``), so the file holds the whole
fleet's log. Children log to their own stdout only.
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_dir: Path, max_bytes: int, backups: int, level: int = logging.INFO) -> Path | None:
    """Configure the root logger; return the log file, or None when the directory cannot be used."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    path = log_dir / "orchestrator.log"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                            encoding="utf-8")
    except OSError as exc:
        logging.getLogger("orchestrator").warning("logs: cannot write to LOG_DIR (%s): stdout only",
                                                  exc.strerror or type(exc).__name__)
        return None
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    for noisy in ("urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path

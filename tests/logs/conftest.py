"""Fixtures of the log tests: a root logger restored after a test that configured it (worker processes and the
runtime's environment come from tests/conftest.py)."""
import logging
import threading

import pytest

from common import logs


@pytest.fixture
def restored_logging():
    """``common.logs.configure`` changes process-wide state: put the root logger and the hooks back after."""
    root = logging.getLogger()
    handlers, level, hook, fmt = list(root.handlers), root.level, threading.excepthook, logs.current_format()
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    threading.excepthook = hook
    logging.captureWarnings(False)
    logs._state["format"] = fmt

"""Fixtures of the log tests: worker processes (killed at the end), the runtime's environment on the real Redis
and the Supabase stand-in, and a root logger restored after a test that configured it."""
import logging
import threading

import pytest

from common import logs
from tests.procs import runtime_env


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture
def env(redis_server, redis_client, supabase_standin, tmp_path):
    return runtime_env(redis_server.url, supabase_standin, tmp_path / "storage")


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

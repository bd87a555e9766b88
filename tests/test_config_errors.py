"""Every entry point turns a malformed setting into one line, ``<program>: configuration error: <message>``, and
exit code ``CONFIG_ERROR``: no traceback, no value echoed, nothing started."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[1]
VALUE = "bogus-Q7"
WORKER = ["-m", "workers"]

CASES = [
    ("workers", WORKER + ["fake", "--handler", "tests.fakes.handlers:create_handler"], "JOB_MAX_ATTEMPTS"),
    ("workers", WORKER + ["fake", "--handler", "tests.fakes.handlers:create_handler"], "WORKER_STOP_GRACE_SECONDS"),
    ("workers", WORKER + ["fake", "--handler", "tests.fakes.handlers:create_handler"], "LOG_LEVEL"),
    ("workers", WORKER + ["sdxl"], "SDXL_ATTENTION"),
    ("workers", WORKER + ["sdxl"], "DEVICE"),
    ("workers", WORKER + ["chat"], "CHAT_MAX_BATCH"),
    ("workers", WORKER + ["wan"], "WAN_ENHANCE_TIMEOUT_SECONDS"),
    ("orchestrator", ["-m", "orchestrator"], "FLEET_STOP_GRACE_SECONDS"),
    ("orchestrator", ["-m", "orchestrator", "status"], "ORCHESTRATOR_STATUS_PORT"),
    ("orchestrator", ["-m", "orchestrator"], "UPSTASH_REDIS_REST_URL"),
    ("router", ["-m", "router"], "ROUTER_THREADS"),
    ("router", ["-m", "router"], "SDXL_PORT"),
    ("memory_manager", ["-m", "memory_manager"], "MEMORY_TICK_SECONDS"),
    ("memory_manager", ["-m", "memory_manager"], "HTTP_READ_TIMEOUT_SECONDS"),
    ("registration", ["-m", "registration"], "REGISTRATION_INTERVAL_SECONDS"),
    ("wan_generate", [str(ROOT / "wan_generate.py"), "--prompt", "a cat", "--out", "cat.png"], "WAN_BATCHED_CFG"),
]


@pytest.mark.parametrize("program, args, variable", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_malformed_setting_is_one_line_and_config_error(program: str, args: list[str], variable: str,
                                                          tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), variable: VALUE}
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == ExitCode.CONFIG_ERROR, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{program}: configuration error: {variable} "), done.stderr
    assert VALUE not in done.stderr + done.stdout and "Traceback" not in done.stdout
    assert list(tmp_path.iterdir()) == []

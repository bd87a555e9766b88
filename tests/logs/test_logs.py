"""``common.logs`` in this process: the JSON formatter, the job fields (bound, cleared, carried to another
thread), and the orchestrator relaying its children's lines (a real child process) in both formats."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import logs
from orchestrator.child import Child
from orchestrator.logs import setup_logging as orchestrator_logging

log = logging.getLogger("tests.logs")


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
def captured(restored_logging) -> io.StringIO:
    stream = io.StringIO()
    logs.configure([logging.StreamHandler(stream)], "info", "json", "test-service")
    yield stream
    logs.clear_job()


def test_one_json_object_per_line_with_the_traceback_inside(captured):
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        log.exception("it broke")
    (line,) = json_lines(captured)
    assert (line["level"], line["logger"], line["message"], line["service"]) == ("ERROR", "tests.logs", "it broke",
                                                                                 "test-service")
    assert "ValueError: line one" in line["exc_info"] and line["time"].endswith("+00:00")


def test_the_job_fields_while_bound_and_on_a_carried_thread_only(captured):
    log.info("before")
    logs.bind_job("job-1", "sdxl_image_fast", "w-1", 2)
    log.info("during")
    carried = threading.Thread(target=logs.carry(log.info), args=("carried",))
    plain = threading.Thread(target=log.info, args=("not carried",))
    for thread in (carried, plain):
        thread.start()
        thread.join()
    logs.clear_job()
    log.info("after")
    lines = {line["message"]: line for line in json_lines(captured)}
    expected = {"job_id": "job-1", "job_type": "sdxl_image_fast", "worker_id": "w-1", "attempt": 2}
    for message in ("during", "carried"):
        assert {k: lines[message].get(k) for k in expected} == expected
    for message in ("before", "not carried", "after"):
        assert "job_id" not in lines[message]


def test_a_thread_that_dies_is_one_json_line(captured):
    thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
    thread.start()
    thread.join()
    (line,) = json_lines(captured)
    assert line["message"] == "thread doomed died" and "ZeroDivisionError" in line["exc_info"]


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        logs.formatter("xml", "x")


def relay(tmp_path: Path, fmt: str) -> list[str]:
    """The orchestrator's log file after it relayed a child's JSON line and its text line."""
    orchestrator_logging(tmp_path, 1 << 20, 1, fmt=fmt)
    child_line = json.dumps({"level": "INFO", "logger": "workers", "message": "ready", "job_id": "j-1"})
    child = Child("chat", (sys.executable, "-c", f"print({child_line!r}); print('plain text')"), {"PATH": "/usr/bin"})
    deadline = time.monotonic() + 10
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)   # the pump thread logs what it read
    for handler in logging.getLogger().handlers:
        handler.flush()
    return (tmp_path / "orchestrator.log").read_text().splitlines()


def test_the_orchestrator_keeps_a_json_child_line_as_an_object(restored_logging, tmp_path):
    lines = [json.loads(line) for line in relay(tmp_path, "json")]
    assert {"level": "INFO", "logger": "workers", "message": "ready", "job_id": "j-1", "program": "chat"} in lines
    text = [line for line in lines if line.get("message") == "chat | plain text"]
    assert text and text[0]["program"] == "chat" and text[0]["service"] == "orchestrator"


def test_the_orchestrator_text_log_is_unchanged(restored_logging, tmp_path):
    lines = relay(tmp_path, "text")
    assert any(line.endswith(' INFO orchestrator.child: chat | {"level": "INFO", "logger": "workers", '
                             '"message": "ready", "job_id": "j-1"}') for line in lines)
    assert any(line.endswith(" INFO orchestrator.child: chat | plain text") for line in lines)


def test_torchaos_start_up_warnings_stay_out_of_a_configured_log():
    """transformers and diffusers import torchao when it is installed; its "Failed to load <extension>" warnings
    (built for another torch) and diffusers' "Unable to import `torchao` Tensor objects" must not fill every
    worker's start-up log. Its errors still pass."""
    script = (
        "import io, logging\n"
        "from common.logs import setup_logging\n"
        "out = io.StringIO()\n"
        "setup_logging('INFO', service='t', stream=out)\n"
        "import torchao  # noqa: F401\n"
        "import diffusers.quantizers.torchao.torchao_quantizer  # noqa: F401\n"
        "logging.getLogger('torchao').warning('hidden')\n"
        "logging.getLogger('torchao').error('shown')\n"
        "print(repr(out.getvalue()))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    logged = run.stdout
    assert "shown" in logged and "hidden" not in logged and "Failed to load" not in logged
    assert "Unable to import `torchao`" not in logged + run.stderr

"""`make demo` runs in CI: the whole fleet under the orchestrator, every job of the demo completes."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_demo_completes_every_job():
    result = subprocess.run([sys.executable, "-m", "local.demo"], cwd=ROOT, capture_output=True,
                            text=True, timeout=880)
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "demo succeeded: every job completed" in result.stdout
    assert "orchestrator exited with 0" in result.stdout
    for name in ("SDXL, 3 images", "SDXL img2img", "WAN video", "WAN image", "WAN video, enhanced", "chat_queue"):
        line = next(x for x in result.stdout.splitlines() if x.startswith(name + " "))
        assert " completed " in line, line
    assert ".mp4" in result.stdout and ".png" in result.stdout

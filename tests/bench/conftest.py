"""The tiny benchmark as the tests run it: ``python -m bench SECTION... --tiny`` in a subprocess on the session's
demo models, its JSON report read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_tiny(sections: list[str], demo: Path, out: Path, timeout: float) -> tuple[subprocess.CompletedProcess, Any]:
    """Run the sections; (the finished process, the JSON report)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    run = subprocess.run([sys.executable, "-m", "bench", *sections, "--tiny", "--json", str(out), "--demo", str(demo)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return run, json.loads(out.read_text())

"""Start real worker processes (``python -m workers ...`` under gunicorn) for tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from local.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def distinct_ports(*names: str) -> dict[str, int]:
    """A free loopback port per name, all different: two ``free_port()`` calls can return the same port (it is
    closed again at once), and a fleet given one port twice refuses to start."""
    chosen: dict[str, int] = {}
    while len(set(chosen.values())) < len(names):
        chosen = {name: free_port() for name in names}
    return chosen


def runtime_env(redis_url: str | None, standin, storage_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTASH_", "REDIS_", "SUPABASE_"))}
    env.update({
        "SUPABASE_URL": standin.url, "SUPABASE_SERVICE_KEY": standin.service_key,
        "JOB_CALLBACK_SECRET": standin.callback_secret, "STORAGE_DIR": str(storage_dir),
        "WORKER_HEARTBEAT_TTL_SECONDS": "2", "QUEUE_POLL_MIN_SECONDS": "0.05", "QUEUE_POLL_MAX_SECONDS": "0.5",
        "CALLBACK_RETRY_SECONDS": "20", "WORKER_ADMIN_KEY": "test-admin-key", "PYTHONUNBUFFERED": "1",
    })
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], kind: str = "fake", slot: int = 0,
                 handler: str | None = "tests.fakes.handlers:create_handler", log_path: Path | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        args = [sys.executable, "-m", "workers", kind, "--port", str(self.port), "--slot", str(slot),
                "--grace", env.get("TEST_GRACE", "30"), *extra_args]
        if handler:
            args += ["--handler", handler]
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError("worker did not become healthy")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            return self.proc.wait(5)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(5)
        if self.log is not subprocess.DEVNULL:
            self.log.close()

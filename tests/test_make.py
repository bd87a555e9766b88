"""What `make` checks on the machine before installing anything (.ci/check-machine), and the lock it installs.

The checks run against stand-in ``python3``, ``redis-server``, ``apt-get`` and ``apt-cache`` executables put
first on PATH: each reports the version a real one on an old machine would, and the fake apt records what it
was asked to install. The Makefile itself is run once with an old ``python3``, to show that the version check
comes before any virtual environment is created.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "check-machine"
OLD_REDIS = "Redis server v=6.0.16 sha=00000000:0 malloc=jemalloc-5.2.1 bits=64 build=a3fdef44459b3ad6"
# The tools the check script and the fakes use, linked into a PATH with no real python3, redis-server or apt.
TOOLS = ("bash", "env", "sed", "sort", "head", "id", "touch", "chmod")


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def fake_python(bin_dir: Path, name: str, version: str, venv_marker: Path | None = None) -> None:
    """An interpreter that reports ``version``; with ``venv_marker`` it has ensurepip only once that file exists."""
    venv = f'[ -e "{venv_marker}" ] || exit 1; exit 0' if venv_marker else "exit 0"
    fake(bin_dir, name, f'case "$2" in *ensurepip*) {venv} ;; esac\necho {version}')


def fake_apt(bin_dir: Path, log: Path, known: str, installs: str) -> None:
    """apt-cache knows only ``known``; apt-get logs its arguments and runs ``installs`` on `install`."""
    fake(bin_dir, "apt-cache", f'[ "$1 $2" = "show {known}" ]')
    fake(bin_dir, "apt-get", f'echo "$*" >> "{log}"\ncase "$1" in install) {installs} ;; esac')
    fake(bin_dir, "sudo", 'exec "$@"')


def isolated_path(bin_dir: Path) -> str:
    """PATH with only the fakes and the few real tools the script needs (no python3, no redis-server)."""
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed by .ci/check-machine or a fake"
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def check(what: str, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": isolated_path(bin_dir), **env}
    return subprocess.run([str(CHECK), what], env=full, capture_output=True, text=True, timeout=60)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


def test_old_python_is_refused_with_its_version_and_the_way_out(bin_dir: Path) -> None:
    fake_python(bin_dir, "python3", "3.9.2")
    result = check("python", bin_dir)
    assert result.returncode == 1
    assert f"Python 3.11 or newer is needed; python3 ({bin_dir}/python3) is Python 3.9.2" in result.stderr
    assert "PYTHON=python3.11 make test" in result.stderr


def test_missing_python_is_named(bin_dir: Path) -> None:
    result = check("python", bin_dir, PYTHON="python3.13")
    assert result.returncode == 1
    assert "python3.13 not found: the fleet needs Python 3.11 or newer" in result.stderr


def test_python_variable_picks_the_interpreter(bin_dir: Path) -> None:
    fake_python(bin_dir, "python3", "3.9.2")
    fake_python(bin_dir, "python3.12", "3.12.4")
    result = check("python", bin_dir, PYTHON="python3.12")
    assert result.returncode == 0, result.stderr
    assert f"python: python3.12 is Python 3.12.4 ({bin_dir}/python3.12)" in result.stdout


def test_missing_venv_module_installs_debians_package(bin_dir: Path, tmp_path: Path) -> None:
    marker, log = tmp_path / "venv-installed", tmp_path / "apt.log"
    fake_python(bin_dir, "python3", "3.11.9", venv_marker=marker)
    fake_apt(bin_dir, log, known="python3.11-venv", installs=f'touch "{marker}"')
    result = check("python", bin_dir)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["update", "install -y python3.11-venv"]
    assert "apt-get install python3.11-venv" in result.stdout
    assert "venv module installed" in result.stdout


def test_venv_module_that_apt_cannot_provide_says_how_to_get_it(bin_dir: Path, tmp_path: Path) -> None:
    marker, log = tmp_path / "never", tmp_path / "apt.log"
    fake_python(bin_dir, "python3", "3.11.9", venv_marker=marker)
    fake_apt(bin_dir, log, known="nothing", installs="exit 100")
    result = check("python", bin_dir)
    assert result.returncode == 1
    assert "python3 has no venv module and apt-get could not install it" in result.stderr
    assert "sudo apt-get install python3.11-venv" in result.stderr


def test_old_redis_is_refused_with_its_version_and_what_needs_it(bin_dir: Path) -> None:
    fake(bin_dir, "redis-server", f'echo "{OLD_REDIS}"')
    result = check("redis", bin_dir)
    assert result.returncode == 1
    assert f"redis-server 6.0.16 ({bin_dir}/redis-server) is older than 6.2" in result.stderr
    assert "LMOVE/BLMOVE" in result.stderr


def test_current_redis_passes(bin_dir: Path) -> None:
    fake(bin_dir, "redis-server", 'echo "Redis server v=7.2.4 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64"')
    result = check("redis", bin_dir)
    assert result.returncode == 0, result.stderr
    assert "redis: redis-server 7.2.4" in result.stdout


def test_missing_redis_is_installed_with_apt(bin_dir: Path, tmp_path: Path) -> None:
    log, server = tmp_path / "apt.log", bin_dir / "redis-server"
    installs = f"printf '#!/bin/sh\\necho \"Redis server v=7.0.15 bits=64\"\\n' > \"{server}\"; chmod +x \"{server}\""
    fake_apt(bin_dir, log, known="redis-server", installs=installs)
    result = check("redis", bin_dir)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["update", "install -y redis-server"]
    assert "redis: redis-server 7.0.15" in result.stdout


def test_missing_redis_without_apt_says_what_to_install(bin_dir: Path) -> None:
    result = check("redis", bin_dir)
    assert result.returncode == 1
    assert "redis-server not found and apt-get could not install it" in result.stderr
    assert "Redis 6.2 or newer" in result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_checks_python_before_creating_the_venv(bin_dir: Path, tmp_path: Path) -> None:
    fake_python(bin_dir, "python3", "3.9.2")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env.pop("PYTHON", None)
    result = subprocess.run(["make", "-C", str(ROOT), f"VENV={venv}", "install"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "is Python 3.9.2" in result.stderr
    assert not venv.exists(), "a venv was created before the Python version was checked"


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names normalised as pip does."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def test_lock_holds_every_pin_of_the_requirements_files() -> None:
    """requirements.lock is regenerated by hand (`make lock`): a pin changed without it fails here."""
    lock = pins(ROOT / "requirements.lock")
    wanted = {**pins(ROOT / "requirements.txt"), **pins(ROOT / "requirements-dev.txt")}
    stale = {name: (version, lock.get(name)) for name, version in wanted.items() if lock.get(name) != version}
    assert not stale, f"requirements.lock disagrees with the pins (wanted, locked): {stale}; run `make lock`"
    requirements = [line for line in (ROOT / "requirements.lock").read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    assert len(requirements) == len(lock), "every line of requirements.lock is an exact name==version pin"


def test_missing_chromium_is_installed_with_apt(bin_dir: Path, tmp_path: Path) -> None:
    log, browser = tmp_path / "apt.log", bin_dir / "chromium"
    installs = (f"printf '#!/bin/sh\\necho \"Chromium 150.0.1 built on Debian\"\\n' > \"{browser}\"; "
                f"chmod +x \"{browser}\"")
    fake_apt(bin_dir, log, known="chromium", installs=installs)
    result = check("chromium", bin_dir)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["update", "install -y chromium"]
    assert "chromium: Chromium 150.0.1 built on Debian" in result.stdout


def test_chromium_that_cannot_be_installed_is_a_warning_not_a_failure(bin_dir: Path) -> None:
    result = check("chromium", bin_dir)
    assert result.returncode == 0
    assert "chromium could not be installed: tests/ops/test_ops_page.py will be skipped" in result.stderr

"""The ops page in a real browser (Debian's headless Chromium) against a whole fleet with jobs flowing.

The fleet is the orchestrator with every program (memory manager, router, registration, and the SDXL, chat and
WAN worker processes with the fast fake handler), real Redis and the Supabase stand-in; the router's collector
asks every second. The browser logs in the way a person does (the HTTP authentication prompt, answered with
the admin key) and the test checks what a person would: the page loads without a console error, refreshes
itself without reloading, the charts have points, the tables list every program and the last jobs with the
failed ones highlighted, nothing secret or written by a user is on it; no key, or a wrong one, is refused.
A screenshot is saved to var/ops.png (docs/ops-page.png is one, for the README).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.fleet.conftest import ADMIN_KEY, _start_rig, fake_fleet_env
from tests.fleet.jobs import element, new_id

from .browser import Browser, executable

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "var" / "ops.png"
PROMPT = "PRIVATE-PROMPT a lighthouse at dusk"
PROGRAMS = ("memory_manager", "router", "registration", "sdxl", "chat", "wan")
TYPES = {"sdxl_queue": "sdxl_image_fast", "wan_queue": "image_fast", "chat_queue": "chat_conversation"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = executable()
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; `make test` installs it)")
    started = Browser(path)
    yield started
    started.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    env = {**fake_fleet_env(tmp_path_factory.mktemp("no-models")), "OPS_COLLECT_SECONDS": "1"}
    rig, close = _start_rig(tmp_path_factory, "ops-fleet", False, env)
    yield rig
    assert not close(), "processes outlived the orchestrator"


class Producer:
    """Pushes a job every ``every`` seconds to each queue in turn, one in five told to fail, until stopped."""

    def __init__(self, client, every: float = 0.1):
        self.client, self.every = client, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            queue = tuple(TYPES)[n % 3]
            config = {"sleep": 0.05, **({"fail": "INVALID_PROMPT"} if n % 5 == 4 else {})}
            self.client.rpush(queue, element(new_id("ops"), TYPES[queue], prompt=PROMPT, config=config))
            n += 1
            self.stop.wait(self.every)

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


CHARTS = ("#pod-chart", ".gpu", "#queue-chart", "#throughput-chart", "#latency-chart")


def test_the_page_shows_the_whole_pod_and_keeps_itself_up_to_date(fleet, browser):
    router = fleet.fleet.url("router")
    tab = browser.tab(("ops", ADMIN_KEY))
    with Producer(fleet.client):
        tab.open(router + "/ops")
        assert tab.statuses[router + "/ops"] == 200 and tab.challenges == 1
        tab.evaluate("window.sameDocument = true")
        tab.wait_for("document.querySelectorAll('#job-table tbody tr:not(:has(.empty))').length >= 20", 30,
                     "the last jobs in the table")
        tab.wait_for("document.querySelector('#job-table tr.failed') !== null", 15, "a failed job highlighted")
        points = " && ".join(f"Number(document.querySelector('{c} svg.chart').dataset.points) > 0" for c in CHARTS)
        tab.wait_for(points, 20, "a point on every chart")
        first = tab.evaluate("document.getElementById('updated').textContent")
        tab.wait_for(f"document.getElementById('updated').textContent !== {first!r}", 10, "a refresh")
        tab.screenshot(SCREENSHOT)

    assert tab.evaluate("window.sameDocument") is True            # refreshed in place, never reloaded
    assert sorted(tab.column("program-table", 0)) == sorted(PROGRAMS)
    assert set(tab.column("program-table", 1)) == {"RUNNING"}
    assert sorted(tab.column("queue-table", 0)) == sorted(TYPES)
    assert set(tab.column("job-table", 7, "tr.failed")) == {"INVALID_PROMPT"}
    assert set(tab.column("job-table", 3, "tr.failed")) == {"failed"}
    assert sorted(tab.column("type-table", 0)) == sorted(TYPES.values())
    assert tab.evaluate("document.querySelector('#sources').textContent") == \
        "memory managergpu utilizationorchestratorredischatpod"  # every source answers
    html = tab.evaluate("document.documentElement.outerHTML")
    assert PROMPT not in html and ADMIN_KEY not in html
    assert tab.console == []
    assert SCREENSHOT.stat().st_size > 20_000


def test_login_is_required_and_a_wrong_key_is_refused(fleet, browser):
    router = fleet.fleet.url("router")
    nobody = browser.tab(None)
    nobody.open(router + "/ops")
    assert nobody.statuses[router + "/ops"] == 401 and nobody.challenges == 1
    assert "admin key is required" in nobody.evaluate("document.body.innerText")

    guesser = browser.tab(("ops", "not-the-admin-key"))
    guesser.open(router + "/ops")
    assert guesser.statuses[router + "/ops"] == 401
    assert guesser.challenges == 2                               # refused, asked again, then given up
    assert "Fleet ops" not in guesser.evaluate("document.body.innerText")
    for headers in ({}, {"Authorization": "Bearer not-the-admin-key"}):
        assert requests.get(router + "/ops/data", headers=headers, timeout=10).status_code == 401

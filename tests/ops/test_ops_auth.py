"""Who may see the ops page (router/ops.py): the admin key as HTTP Basic's password (any user name) or as a
Bearer key; nothing else, the key never in a URL, refusals logged without what was sent; and the headers that
keep the page to itself (CSP by hash, no-store, no framing)."""
from __future__ import annotations

import base64
import hashlib
import logging
import re

import pytest
import requests

from common.background import BackgroundServer
from common.settings import Secret
from router.app import RouterDeps, create_app
from router.ops import PAGE

KEY = "ops-admin-key-4f1c9e"
DEAD = {"sdxl": "http://127.0.0.1:9", "wan": "http://127.0.0.1:9"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def router():
    server = BackgroundServer(create_app(RouterDeps(backends=DEAD, admin_key=Secret(KEY))))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyless_router():
    server = BackgroundServer(create_app(RouterDeps(backends=DEAD)))
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/ops", "/ops/data"])
@pytest.mark.parametrize("header", [basic("ops", KEY), basic("", KEY), f"Bearer {KEY}"],
                         ids=["basic", "basic-no-user", "bearer"])
def test_the_admin_key_opens_both_routes(router, path, header):
    answer = requests.get(router.url + path, headers={"Authorization": header}, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors" in answer.headers.get("Content-Security-Policy", "") or path == "/ops/data"


@pytest.mark.parametrize("path", ["/ops", "/ops/data"])
@pytest.mark.parametrize("header", [None, basic("ops", "wrong"), basic("ops", KEY + "x"), basic(KEY, ""),
                                    "Basic not-base64!", "Basic " + base64.b64encode(KEY.encode()).decode(),
                                    "Bearer wrong", f"Token {KEY}", KEY],
                         ids=["none", "wrong", "longer", "key-as-user", "malformed", "no-colon", "bearer-wrong",
                              "other-scheme", "bare-key"])
def test_anything_else_is_refused_with_the_basic_challenge(router, path, header):
    headers = {"Authorization": header} if header else {}
    answer = requests.get(router.url + path, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith('Basic realm="fleet ops"')
    assert answer.json()["success"] is False
    assert KEY not in answer.text


def test_the_key_in_the_url_is_not_a_login(router):
    for url in (f"/ops?key={KEY}", f"/ops/data?token={KEY}", f"/ops?password={KEY}"):
        assert requests.get(router.url + url, timeout=10).status_code == 401


def test_a_wrong_key_is_logged_without_what_was_sent(router, caplog):
    with caplog.at_level(logging.INFO, logger="router.ops"):
        requests.get(router.url + "/ops", headers={"Authorization": basic("me", "guess-123456")}, timeout=10)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and "guess-123456" not in " ".join(refusals) and "127.0.0.1" in refusals[0]


def test_without_an_admin_key_nothing_opens(keyless_router):
    for path in ("/ops", "/ops/data"):
        for header in (basic("ops", KEY), f"Bearer {KEY}", basic("ops", ""), None):
            answer = requests.get(keyless_router.url + path, headers={"Authorization": header} if header else {},
                                  timeout=10)
            assert answer.status_code == 401 and "WORKER_ADMIN_KEY is not set" in answer.json()["error"]


def test_the_page_allows_only_its_own_inline_script_and_style(router):
    answer = requests.get(router.url + "/ops", headers={"Authorization": basic("ops", KEY)}, timeout=10)
    policy = dict(part.strip().split(" ", 1) for part in answer.headers["Content-Security-Policy"].split(";"))
    html = PAGE.read_text()
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    digest = lambda text: "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"  # noqa: E731
    assert policy == {"default-src": "'none'", "script-src": digest(script), "style-src": digest(style),
                      "connect-src": "'self'", "img-src": "data:", "base-uri": "'none'", "form-action": "'none'",
                      "frame-ancestors": "'none'"}
    assert answer.headers["Content-Type"].startswith("text/html") and answer.text == html
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet|https?://(?!www\.w3\.org/2000/svg)", html)

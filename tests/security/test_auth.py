"""The auth matrix (CONTRACT §5): every endpoint × {no key, wrong key, chat key, WAN key, admin key}.

Client routes take the WAN or the chat key (no header at all only with ALLOW_ANONYMOUS_API); control routes
only the admin key, and nothing at all when WORKER_ADMIN_KEY is unset; /health, /metrics and the read-only
status routes are open. Fleet A refuses anonymous calls; fleet B allows them and has no admin key.
"""
from __future__ import annotations

import ast
import inspect

import pytest
import requests

from common import http
from common.settings import Secret

from .endpoints import Endpoint, all_endpoints
from .fleet import ADMIN_KEY, CHAT_KEY, ROOT, WAN_KEY

KEYS = {"none": None, "wrong": "SEKRET-not-a-key", "chat": CHAT_KEY, "wan": WAN_KEY, "admin": ADMIN_KEY}
ENDPOINTS = all_endpoints()


def expected(endpoint: Endpoint, key: str, anonymous: bool, admin_set: bool) -> int:
    """The documented answer for one cell of the matrix."""
    if endpoint.auth == "open":
        return endpoint.ok
    if endpoint.auth == "client":
        allowed = key in ("chat", "wan") or (key == "none" and anonymous)
    else:
        allowed = key == "admin" and admin_set
    return endpoint.ok if allowed else 401


def call(fleet, endpoint: Endpoint, token: str | None, raw_header: str | None = None) -> requests.Response:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw_header is not None:
        headers["Authorization"] = raw_header
    return requests.request(endpoint.method, fleet.url(endpoint.program) + endpoint.path, json=endpoint.body,
                            headers=headers, timeout=60)


@pytest.mark.parametrize("fleet_name", ["a", "b"])
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e.label for e in ENDPOINTS])
def test_auth_matrix(fleets, fleet_name, endpoint):
    fleet = fleets[fleet_name]
    anonymous, admin_set = fleet_name == "b", fleet_name == "a"
    wrong = []
    for key, token in KEYS.items():
        answer = call(fleet, endpoint, token)
        want = expected(endpoint, key, anonymous, admin_set)
        if answer.status_code != want:
            wrong.append(f"{key}: got {answer.status_code} want {want}: {answer.text[:120]}")
        if answer.status_code == 401:
            body = answer.json()
            assert body.get("success") is False or "error" in body, body  # JSON error, never a page
    assert not wrong, f"{endpoint.label}: " + "; ".join(wrong)


MALFORMED = ["Basic " + CHAT_KEY, "Bearer", "Bearer ", CHAT_KEY, f"Bearer {CHAT_KEY}x", f"Bearer {CHAT_KEY[:-1]}",
             f"Bearer {CHAT_KEY.upper()}", f"Bearer {WAN_KEY},{CHAT_KEY}", f"Token {ADMIN_KEY}"]


@pytest.mark.parametrize("header", MALFORMED)
def test_malformed_or_near_miss_credentials_are_refused(fleets, header):
    chat = Endpoint("chat", "GET", "/worker/info", "client")
    admin = Endpoint("router", "GET", "/debug/env", "admin")
    for fleet_name in ("a", "b"):  # fleet B allows *no header*, never a bad one
        assert call(fleets[fleet_name], chat, None, header).status_code == 401
    assert call(fleets["a"], admin, None, header.replace(CHAT_KEY, ADMIN_KEY)).status_code == 401


def test_bearer_scheme_is_case_insensitive_and_trimmed(fleet_a):
    chat = Endpoint("chat", "GET", "/worker/info", "client")
    assert call(fleet_a, chat, None, f"bearer {CHAT_KEY}").status_code == 200
    assert call(fleet_a, chat, None, f"Bearer   {WAN_KEY}  ").status_code == 200


def test_key_comparison_is_constant_time_and_checks_every_key():
    source = inspect.getsource(http.key_matches)
    assert "hmac.compare_digest" in source
    revealed = []

    class Spy(Secret):
        def reveal(self):
            revealed.append(self)
            return super().reveal()

    first, second = Spy("k1"), Spy("k2")
    assert http.key_matches("k1", [first, second, None])
    assert revealed == [first, second]  # no early exit on the first match
    assert not http.key_matches(None, [first])
    assert not http.key_matches("k", [None])


RUNTIME_PACKAGES = ("common", "workers", "orchestrator", "router",
                    "memory_manager", "registration")


def test_no_secret_is_compared_with_equality_anywhere_in_runtime_code():
    """A ``.reveal()`` or an Authorization header value must never meet ``==``/``!=``/``in``: only
    ``hmac.compare_digest`` (through ``common.http.key_matches``)."""
    offenders = []
    for package in RUNTIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare) and any(_is_secretish(n) for n in [node.left, *node.comparators]):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def _is_secretish(node: ast.AST) -> bool:
    text = ast.unparse(node).replace('"', "'")
    return ".reveal()" in text or "headers.get('Authorization'" in text or "headers['Authorization']" in text


def test_every_auth_check_goes_through_the_shared_decorators():
    """Routes never read the Authorization header themselves (only common/http.py does)."""
    readers = [str(p.relative_to(ROOT)) for package in RUNTIME_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
               if "headers.get(\"Authorization\"" in p.read_text() or "headers['Authorization']" in p.read_text()]
    assert readers == ["common/http.py"]

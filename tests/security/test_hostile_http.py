"""Hostile bodies on every POST endpoint of every process (chat, WAN, SDXL, router, memory manager):
oversized (413), deeply nested, not UTF-8, not JSON, not an object, huge prompts, unknown keys and a wrong
type in every documented field. The answer is always a 4xx JSON error (or a 200 where the input is
acceptable), never a 5xx, a stack trace, a path or a secret — and the processes keep serving."""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from common import openapi

from .endpoints import GOOD_BODIES, TINY, Endpoint, all_endpoints
from .fleet import ADMIN_KEY, CHAT_KEY, PROGRAMS

LIMITS = {"router": 2 * 1024 * 1024, "memory_manager": 64 * 1024, "chat": 1024 * 1024, "wan": 1024 * 1024,
          "sdxl": 1024 * 1024}
POSTS = [e for e in all_endpoints() if e.method == "POST"]
TOKEN = {"client": CHAT_KEY, "admin": ADMIN_KEY, "open": None}
WRONG_VALUES = [True, 0, -1, 10 ** 30, 1.5e308, "abc\u0000", [], [1, "x"], {"$gt": ""}]


def post(fleet, endpoint: Endpoint, data: bytes, content_type: str = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type}
    if TOKEN[endpoint.auth]:
        headers["Authorization"] = f"Bearer {TOKEN[endpoint.auth]}"
    return requests.post(fleet.url(endpoint.program) + endpoint.path, data=data, headers=headers, timeout=60)


def assert_clean_error(answer: requests.Response, *statuses: int) -> dict:
    assert answer.status_code in statuses, (answer.status_code, answer.text[:300])
    assert answer.headers["Content-Type"].startswith("application/json"), answer.headers["Content-Type"]
    body = answer.json()
    text = answer.text
    for leak in ("Traceback", "File \"/", "/work/", "/tmp/", "SEKRET-", "site-packages"):
        assert leak not in text, (leak, text[:300])
    return body


@pytest.mark.parametrize("endpoint", POSTS, ids=[e.label for e in POSTS])
def test_malformed_bodies_get_a_json_4xx(fleet_a, endpoint):
    limit = LIMITS[endpoint.program]
    depth = min(100_000, limit // 8)
    cases = [
        (b"x" * int(limit * 1.5), 413),
        (b"[" * depth + b"]" * depth, 400),
        (b'{"a":' * depth + b"1" + b"}" * depth, 400),
        (b'{"prompt": "caf\xe9 \xff\xfe", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),
        (b'{"messages": [', 400),
        (b"[]", 400), (b'"a string"', 400), (b"12", 400), (b"null", 400), (b"true", 400),
        (b"\xef\xbb\xbf{}", 400),  # a byte-order mark: not JSON to a strict parser
        (b'{"a": NaN, "b": Infinity}', 400),
    ]
    if endpoint.schema not in (None, "Which"):  # an empty body means `which=all` on the control routes
        cases.append((b"", 400))
    for data, status in cases:
        assert_clean_error(post(fleet_a, endpoint, data), status)


@pytest.mark.parametrize("program", ["router", "chat"])
def test_oversized_bodies_through_the_router_and_to_the_worker_are_413_json(fleet_a, program):
    path = "/enhance" if program == "router" else "/chat"
    endpoint = Endpoint(program, "POST", path, "client")
    for size in (int(1.5 * 1024 * 1024), 3 * 1024 * 1024):  # router: forwarded then refused; refused itself
        body = assert_clean_error(post(fleet_a, endpoint, b"{" + b" " * size + b"}"), 413)
        assert "larger than" in body["error"]


def test_huge_prompts_and_long_conversations_are_refused_with_the_field_named(fleet_a):
    chat = Endpoint("chat", "POST", "/chat", "client")
    huge = {"messages": [{"role": "user", "content": "word " * 60_000}], "max_tokens": 2}
    assert "too long" in assert_clean_error(post(fleet_a, chat, json.dumps(huge).encode()), 400)["error"]
    many = {"messages": [{"role": "user", "content": "hi"}] * 300, "max_tokens": 2}
    assert "messages" in assert_clean_error(post(fleet_a, chat, json.dumps(many).encode()), 400)["error"]
    wan = Endpoint("router", "POST", "/enhance", "client")
    body = assert_clean_error(post(fleet_a, wan, json.dumps({"prompt": "a" * 5000}).encode()), 400)
    assert "prompt" in body["error"]
    generate = Endpoint("chat", "POST", "/generate", "client")
    inputs = {"inputs": "x" * 250_000, "parameters": {"max_new_tokens": 2}}
    assert_clean_error(post(fleet_a, generate, json.dumps(inputs).encode()), 400)


def test_unknown_keys_are_ignored(fleet_a):
    extra = {"conversation_id": "c-1", "project_context": {"a": [1, {"b": None}]}, "content_tier": "nsfw",
             "context_type": "x", "__proto__": {"admin": True}, "constructor": {"prototype": {}}}
    for path, base in (("/chat", TINY), ("/enhance", GOOD_BODIES["EnhanceRequest"]),
                       ("/v1/chat/completions", TINY), ("/generate", GOOD_BODIES["GenerateRequest"])):
        answer = post(fleet_a, Endpoint("chat", "POST", path, "client"), json.dumps({**base, **extra}).encode())
        assert answer.status_code == 200, (path, answer.text[:200])
    wan = post(fleet_a, Endpoint("router", "POST", "/enhance", "client"),
               json.dumps({**GOOD_BODIES["WanEnhanceRequest"], **extra}).encode())
    assert wan.status_code == 200, wan.text[:200]


# ---------------------------------------------------------------------------------------------- wrong types
def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = openapi.SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in schema:  # GenerateRequest: the {inputs, parameters} branch (the other is ChatRequest)
        schema = _resolve(schema["oneOf"][-1])
    return schema


def field_paths(schema: dict, body: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """``(path, field schema)`` for every documented field (present in ``body`` or not), and the fields of
    nested objects and of the first item of arrays of objects that ``body`` holds."""
    schema = _resolve(schema)
    for name, sub in schema.get("properties", {}).items():
        sub = _resolve(sub)
        yield prefix + (name,), sub
        value = body.get(name) if isinstance(body, dict) else None
        if sub.get("type") == "object" and isinstance(value, dict):
            yield from field_paths(sub, value, prefix + (name,))
        if sub.get("type") == "array" and isinstance(value, list) and value and isinstance(value[0], dict):
            yield from field_paths(sub["items"], value[0], prefix + (name, 0))


def must_refuse(schema: dict, value: Any) -> bool:
    """Whether ``value`` plainly violates the field's schema. Falsy values (``0``, ``""``, ``[]``, ``{}``,
    ``false``) may be read as "absent" (the default applies), so only a 5xx counts against them."""
    if not value and value is not True:
        return False
    if "enum" in schema or "const" in schema:
        return value not in schema.get("enum", [schema.get("const")]) or isinstance(value, bool)
    kind = schema.get("type")
    if kind in ("integer", "number"):
        if isinstance(value, str):
            return not _numeric(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        return not schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    expected = {"string": str, "boolean": bool, "array": list, "object": dict}.get(kind)
    return expected is not None and not isinstance(value, expected)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def with_value(body: Any, path: tuple, value: Any) -> Any:
    changed = copy.deepcopy(body)
    target = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return changed


TYPED = [(e, e.schema) for e in POSTS if e.schema and e.schema != "Which" and e.program in ("chat", "router")]


@pytest.mark.parametrize("endpoint, schema_name", TYPED, ids=[e.label for e, _ in TYPED])
def test_a_wrong_type_in_any_field_is_a_400_naming_it_never_a_5xx(fleet_a, endpoint, schema_name):
    schema = openapi.SCHEMAS[schema_name]
    problems = []
    for path, sub in field_paths(schema, endpoint.body):
        for value in WRONG_VALUES:
            answer = post(fleet_a, endpoint, json.dumps(with_value(endpoint.body, path, value)).encode())
            label = f"{'.'.join(map(str, path))}={value!r:.20}"
            media = answer.headers["Content-Type"].split(";")[0]
            if answer.status_code >= 500 or media not in ("application/json", "text/event-stream"):
                problems.append(f"{label}: {answer.status_code} {answer.text[:100]}")
            elif must_refuse(sub, value) and answer.status_code != 400:
                problems.append(f"{label}: accepted ({answer.status_code}), expected 400")
            elif answer.status_code == 400:
                assert_clean_error(answer, 400)
    assert not problems, "\n".join(problems)


def test_control_routes_reject_wrong_types_without_side_effects(fleet_a):
    for program in ("chat", "wan", "sdxl", "router"):
        for route in ("/memory/load", "/memory/unload"):
            prefix = "/wan" if program == "router" else ""
            endpoint = Endpoint(program, "POST", prefix + route, "admin")
            for value in (True, 5, [], {"a": 1}, ["all"]):
                assert_clean_error(post(fleet_a, endpoint, json.dumps({"which": value}).encode()), 400)
            if program in ("chat", "sdxl"):  # WAN reads any unknown name as "all" (reported, not changed)
                garbage = Endpoint(program, "POST", route + "?which=%ff%fe", "admin")
                assert_clean_error(post(fleet_a, garbage, b"{}"), 400)
    manager = Endpoint("memory_manager", "POST", "/reservations", "admin")
    for body in ({"worker": 5}, {"worker": "sdxl", "gpu": "0"}, {"worker": "sdxl", "gpu": 99},
                 {"worker": "sdxl", "gb": -1}, {"worker": "sdxl", "gb": "lots"}, {"worker": ["sdxl"]},
                 {"worker": "sdxl", "gb": 1e308, "gpu": True}):
        assert_clean_error(post(fleet_a, manager, json.dumps(body).encode()), 400)
    emergency = Endpoint("memory_manager", "POST", "/emergency/operation", "admin")
    for body in ({"operation": 5}, {"operation": ["status"]}, {"operation": "rm -rf"},
                 {"operation": "force_unload_all_except", "keep": 5},
                 {"operation": "force_unload_all_except", "keep": "sdxl", "gpu": "zero"},
                 {"operation": "handle_emergency_request", "worker": {}, "gb": "x"}):
        assert_clean_error(post(fleet_a, emergency, json.dumps(body).encode()), 400)


def test_every_process_still_serves_after_the_abuse(fleet_a):
    for program in PROGRAMS:
        path = "/router/health" if program == "router" else "/health"
        assert requests.get(fleet_a.url(program) + path, timeout=10).status_code == 200, program
    assert fleet_a.proc.poll() is None
    answer = post(fleet_a, Endpoint("chat", "POST", "/chat", "client"), json.dumps(TINY).encode())
    assert answer.status_code == 200 and answer.json()["success"] is True


ODD_PATHS = ["/%ff%fe", "/wan/%00", "/wan/..%2fdebug/env", "/wan/../sdxl/debug/env", "//health", "/sdxl//health",
             "/wan/" + "a" * 6000, "/enhance/../debug/env", "/memory/%2e%2e/debug/env", "/sdxl/health?x=%ff"]


@pytest.mark.parametrize("program", ["router", "chat", "memory_manager"])
def test_odd_paths_never_reach_a_control_route_or_a_5xx(fleet_a, program):
    for path in ODD_PATHS:
        answer = requests.get(fleet_a.url(program) + path, timeout=30)
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:200])
        assert "versions" not in answer.text, path  # /debug/env never answers without the admin key

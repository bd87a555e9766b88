"""The OpenAPI 3.1 documents (``common.openapi``): valid, served at ``GET /openapi.json`` on the router
(7860) and the chat worker (7861), complete (every route of every app is documented and nothing documented
is missing), and a schemathesis run against both live ports with the ``not_a_server_error`` check.

The schemathesis run (its Python API) sends generated valid and invalid requests with the right key for each operation
(``x-auth`` in the document). ``/memory/load`` and ``/memory/unload`` are left out of it: a generated valid
``which`` unloads models under the other tests (they are covered by test_auth and test_hostile_http).
"""
from __future__ import annotations

import re

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from common import openapi
from router.app import RouterDeps, resolve
from router.app import create_app as router_app
from workers.chat.settings import ChatSettings
from workers.core.service import Service
from workers.sdxl.settings import SdxlSettings
from workers.wan.settings import WanSettings

from .fleet import ADMIN_KEY, CHAT_KEY

KINDS = ("chat", "wan", "sdxl")
CONTROL = r"/memory/(load|unload)$"


@pytest.mark.parametrize("document", [openapi.worker_document(k) for k in KINDS] + [openapi.router_document()],
                         ids=[*KINDS, "router"])
def test_documents_are_valid_openapi_3_1(document):
    assert document["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in document["paths"].values())
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert operation["x-auth"] in openapi.AUTH_KINDS
            assert ("security" in operation) == (operation["x-auth"] != "open"), (method, path)
            if operation["x-auth"] != "open":
                assert "401" in operation["responses"]


def test_documents_are_served_live(fleet_a):
    served = {
        "router": requests.get(fleet_a.url("router") + "/openapi.json", timeout=10),
        "chat": requests.get(fleet_a.url("chat") + "/openapi.json", timeout=10),
        "wan": requests.get(fleet_a.url("router") + "/wan/openapi.json", timeout=10),
        "sdxl": requests.get(fleet_a.url("router") + "/sdxl/openapi.json", timeout=10),
    }
    assert {name: r.status_code for name, r in served.items()} == dict.fromkeys(served, 200)
    assert served["router"].json() == openapi.router_document()
    for kind in KINDS:
        assert served[kind].json() == openapi.worker_document(kind)
    for answer in served.values():
        assert "SEKRET" not in answer.text and "/tmp/" not in answer.text


def _never_exits(code):
    raise AssertionError(f"the app under inspection tried to exit the process with {code}")


def _worker_app(kind: str, demo_models):
    settings = {"chat": lambda: ChatSettings(qwen_instruct_path=demo_models["qwen_instruct"],
                                             qwen_base_path=demo_models["qwen_base"], device="cpu"),
                "wan": lambda: WanSettings(wan_model_path=demo_models["wan"], device="cpu"),
                "sdxl": lambda: SdxlSettings(sdxl_model_path=demo_models["sdxl"], device="cpu")}[kind]()
    module = __import__(f"workers.{kind}", fromlist=["create_handler"])
    handler = module.create_handler(settings)  # constructed, never set up: no model is loaded
    create_routes = getattr(module, "create_routes", None)   # SDXL declares none
    routes = (lambda residency: create_routes(handler, residency)) if create_routes else None
    return Service(settings, handler, f"openapi-{kind}", exit_process=_never_exits, routes=routes).create_app()


def _routes(app) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
            for method in rule.methods - {"HEAD", "OPTIONS"}}


@pytest.mark.parametrize("kind", KINDS)
def test_every_worker_route_is_documented_and_every_documented_route_exists(kind, demo_models):
    documented = {(op.method, op.path) for op in openapi.worker_ops(kind)}
    assert _routes(_worker_app(kind, demo_models)) == documented


def test_every_router_operation_is_served_by_the_router_or_a_documented_worker_route():
    app = router_app(RouterDeps(backends={"sdxl": "http://127.0.0.1:9", "wan": "http://127.0.0.1:9"}))
    own = {(m, rule.rule) for rule in app.url_map.iter_rules() if rule.endpoint not in ("static", "forward")
           for m in rule.methods - {"HEAD", "OPTIONS"}}  # "forward": the catch-all, checked below
    assert own == {(op.method, op.path) for op in openapi.ROUTER_OWN}
    workers = {kind: {(op.method, op.path) for op in openapi.worker_ops(kind)} for kind in ("sdxl", "wan")}
    for op in openapi.router_ops():
        if (op.method, op.path) in own:
            continue
        backend, path = resolve(op.path)
        assert (op.method, path) in workers[backend], op
    prefixed = {(op.method, op.path) for op in openapi.router_ops()}
    for kind, routes in workers.items():  # and every worker route is reachable (and documented) under its prefix
        assert {(m, f"/{kind}{p}") for m, p in routes} <= prefixed


# ---------------------------------------------------------------------------------------------- schemathesis
# schemathesis' lazy pytest fixture loader (``schemathesis.pytest.from_fixture``) does not work with pytest 9
# (it rewrites ``node._nodeid``), so each operation runs through its hypothesis strategy here instead: the same
# generated cases and the same check, with every failure collected and reported together.
CONFIG = schemathesis.Config.from_dict({"seed": 7860, "request-timeout": 60})
TOKENS = {"open": None, "client": CHAT_KEY, "admin": ADMIN_KEY}
EXAMPLES = 4  # per operation and generation mode: ~270 requests in all, well under a minute


def fuzz(base_url: str) -> tuple[list[str], dict[str, int]]:
    """Failures, and how many requests each operation got."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", config=CONFIG)
    schema.config.update(base_url=base_url)
    failures: list[str] = []
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if re.search(CONTROL, operation.path):
            continue
        token = TOKENS[operation.definition.raw.get("x-auth", "open")]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        raw = operation.definition.raw
        modes = [GenerationMode.POSITIVE]
        if "requestBody" in raw or raw.get("parameters"):  # nothing to make invalid otherwise
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def run(case):
                sent[operation.label] = sent.get(operation.label, 0) + 1
                try:
                    case.call_and_validate(headers=headers, checks=[not_a_server_error])
                except (AssertionError, Exception) as exc:  # noqa: BLE001 - collected and reported below
                    failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {str(exc)[:300]}")

            run()
    return failures, sent


@pytest.mark.parametrize("program", ["router", "chat"])
def test_schemathesis_finds_no_server_error(fleet_a, program):
    failures, sent = fuzz(fleet_a.url(program))
    assert failures == []
    documented = openapi.router_ops() if program == "router" else openapi.worker_ops("chat")
    # schemathesis leaves out the operation that serves the schema it loaded (GET /openapi.json)
    expected = {f"{op.method} {op.path}" for op in documented if not re.search(CONTROL, op.path)}
    assert set(sent) == expected - {"GET /openapi.json"}

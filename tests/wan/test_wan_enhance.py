"""Prompt enhancement through a (fake) chat worker on loopback: the request we send, the prompt actually
used, fallbacks when the chat worker is down, slow or wrong, the operator's template, and WAN's own
``POST /enhance`` route over real HTTP."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import requests

from common.http import create_base_app
from local.net import BackgroundServer, free_port
from workers.wan.enhance import DEFAULT_TEMPLATE, PromptEnhancer
from workers.wan.routes import create_routes

from .conftest import CHAT_KEY, WAN_KEY, handler_with, make_job, no_progress


def test_enhanced_job_uses_the_rewritten_prompt(handler, models, chat):
    result = handler.run(make_job("image7b_fast_enhanced", prompt="a dog"), no_progress)
    meta = result.metadata
    assert meta["enhanced_prompt"] == "vivid cinematic shot: a dog" and meta["original_prompt"] == "a dog"
    assert meta["enhancement_source"] == "qwen_base" and meta["enhancement_applied"] is True
    assert models.last["prompt"] == "vivid cinematic shot: a dog"
    [(headers, body)] = chat.requests
    assert headers["authorization"] == f"Bearer {CHAT_KEY}" and body["model"] == "qwen_base"
    assert body["messages"] == [{"role": "system", "content": DEFAULT_TEMPLATE.read_text().strip()},
                                {"role": "user", "content": "a dog"}]


def test_config_flag_and_metadata_instruction(handler, chat):
    result = handler.run(make_job("image_fast", prompt="a boat", config={"enhance_prompt": True},
                                  metadata={"enhance_instruction": "Translate to French."}), no_progress)
    assert result.metadata["enhanced_prompt"] == "vivid cinematic shot: a boat"
    assert chat.requests[0][1]["messages"][0] == {"role": "system", "content": "Translate to French."}


def test_chat_worker_down_keeps_the_original_prompt_and_says_so(models, wan_settings):
    handler = handler_with(models, wan_settings, chat_worker_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = handler.run(make_job("image7b_high_enhanced", prompt="a tree"), no_progress)
    meta = result.metadata
    assert meta["enhancement_applied"] is False and "unreachable" in meta["enhancement_error"]
    assert "enhanced_prompt" not in meta and models.last["prompt"] == "a tree"
    assert meta["enhancement_time"] <= 1.2 and time.monotonic() - started < 30


def test_slow_chat_worker_is_cut_off_at_the_timeout(handler, models, chat):
    chat.mode, chat.delay = "slow", 4.0
    result = handler.run(make_job("image7b_fast_enhanced", prompt="a lake"), no_progress)
    meta = result.metadata
    assert meta["enhancement_applied"] is False and "did not answer within 1 s" in meta["enhancement_error"]
    assert 0.9 <= meta["enhancement_time"] < 1.5 and models.last["prompt"] == "a lake"


@pytest.mark.parametrize("mode,fragment", [("garbage", "no enhanced prompt"), ("error", "HTTP 500")])
def test_bad_answers_fall_back(handler, chat, mode, fragment):
    chat.mode = mode
    result = handler.run(make_job("image7b_fast_enhanced"), no_progress)
    assert result.metadata["enhancement_applied"] is False and fragment in result.metadata["enhancement_error"]


def test_operator_template_file_with_prompt_placeholder(wan_settings, chat, tmp_path):
    template = tmp_path / "template.txt"
    template.write_text("Improve this video idea: {prompt}\n")
    enhancer = PromptEnhancer.from_settings(replace(wan_settings, wan_enhance_template=template))
    assert enhancer.enhance("a fox") == "vivid cinematic shot: Improve this video idea: a fox"
    assert chat.requests[0][1]["messages"] == [{"role": "user", "content": "Improve this video idea: a fox"}]
    template.unlink()
    assert enhancer.try_enhance("a fox").error.startswith("the enhancement template cannot be read")


# ----------------------------------------------------------------------------------------- POST /enhance
@pytest.fixture
def wan_http(handler):
    app = create_base_app("wan-worker", lambda: (True, {}))
    app.register_blueprint(create_routes(handler))
    server = BackgroundServer(app, name="wan-http")
    yield server
    server.stop()


def post(server, body, key=WAN_KEY, path="/enhance"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.url + path, json=body, headers=headers, timeout=10)


def test_enhance_route_answers_the_contract_shape(wan_http, chat):
    for key in (WAN_KEY, CHAT_KEY):
        response = post(wan_http, {"prompt": "a city at night", "model": "qwen_base"}, key)
        body = response.json()
        assert response.status_code == 200 and body["success"] is True
        assert body["enhanced_prompt"] == "vivid cinematic shot: a city at night"
        assert body["original_prompt"] == "a city at night" and body["enhancement_source"] == "qwen_base"
        assert isinstance(body["processing_time"], float)


@pytest.mark.parametrize("body,key,status", [({"prompt": "x"}, None, 401), ({"prompt": "x"}, "wrong", 401),
                                             ({"prompt": "  "}, WAN_KEY, 400), ({}, WAN_KEY, 400),
                                             ({"prompt": "x", "model": "gpt"}, WAN_KEY, 400),
                                             ({"prompt": "x" * 3000}, WAN_KEY, 400)])
def test_enhance_route_refuses_bad_requests(wan_http, chat, body, key, status):
    response = post(wan_http, body, key)
    assert response.status_code == status and response.json()["success"] is False
    assert chat.requests == []


def test_enhance_route_reports_chat_worker_trouble(wan_http, chat):
    chat.mode = "garbage"
    response = post(wan_http, {"prompt": "x"})
    assert response.status_code == 502 and "no enhanced prompt" in response.json()["error"]
    chat.mode = "slow"
    started = time.monotonic()
    response = post(wan_http, {"prompt": "x"})
    assert response.status_code == 503 and "did not answer" in response.json()["error"]
    assert time.monotonic() - started < 2.5


def test_enhance_route_without_chat_worker_is_503(models, wan_settings):
    handler = handler_with(models, wan_settings, chat_worker_url=f"http://127.0.0.1:{free_port()}",
                           chat_worker_api_key=None, allow_anonymous=True)
    app = create_base_app("wan-worker", lambda: (True, {}))
    app.register_blueprint(create_routes(handler))
    client = app.test_client()
    response = client.post("/enhance", json={"prompt": "x"})   # anonymous allowed by the setting
    assert response.status_code == 503 and response.get_json()["success"] is False
    assert "unreachable" in response.get_json()["error"]
    assert client.post("/enhance", json={"prompt": "x"},
                       headers={"Authorization": "Bearer nope"}).status_code == 401

"""The chat HTTP API over real HTTP on loopback: the app's request bodies, errors, auth, models."""
from __future__ import annotations

import json

import pytest

from .conftest import AUTH, CHAT_KEY, WAN_KEY, Served

SYSTEM = {"role": "system", "content": "You are a friendly storyteller. Keep answers short."}


def history(turns: int) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"turn {i}: a cat sitting on a red chair"} for i in range(turns)]


def app_body(**extra):
    """What the web app sends: system + 16 history turns + the newest message, penalties and its own keys."""
    return {"messages": [SYSTEM, *history(16), {"role": "user", "content": "Tell me about the city at night."}],
            "max_tokens": 24, "temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.3, "frequency_penalty": 0.2,
            "content_tier": "nsfw", "conversation_id": "c0ffee", "project_context": {"name": "x"},
            "context_type": "story", "sfw_mode": False, **extra}


def test_chat_with_the_apps_body(served):
    response = served.post("/chat", app_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert isinstance(body["response"], str)
    assert 0 < body["tokens_generated"] <= 24
    assert body["generation_time"] > 0
    info = body["model_info"]
    assert info["model"] == "qwen_instruct" and info["requested_model"] == "qwen_instruct"
    assert info["finish_reason"] in ("stop", "length") and info["context_truncated"] is False
    assert "conversation_id" not in json.dumps(body)


def test_unrestricted_route(served):
    body = served.post("/chat/unrestricted", app_body(sfw_mode=True)).json()
    assert body["success"] is True and body["model_info"]["unrestricted_mode"] is True
    assert "sfw_filtered_words" not in body["model_info"]


def test_defaults_apply(served):
    body = served.post("/chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}).json()
    assert body["success"] is True
    assert body["tokens_generated"] <= 512


def test_enhance_returns_enhanced_prompt(served):
    response = served.post("/enhance", {"prompt": "a cat on a chair", "max_tokens": 16})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and isinstance(body["enhanced_prompt"], str) and body["enhanced_prompt"]
    assert body["original_prompt"] == "a cat on a chair"
    assert body["tokens_generated"] <= 16 and "model_info" in body and "response" not in body

    messages = served.post("/enhance", {"messages": [{"role": "user", "content": "a dog in the park"}],
                                        "max_tokens": 8}).json()
    assert messages["success"] is True and messages["original_prompt"] == "a dog in the park"


def test_enhancement_info(served):
    body = served.get("/enhancement/info").json()
    assert body["defaults"] == {"max_tokens": 200, "temperature": 0.7, "top_p": 0.9}
    assert "enhanced_prompt" in body["response_fields"] and "messages" in body["request_fields"]
    assert body["models"]["qwen_instruct"]["loaded"] is True


def test_generate_both_forms(served):
    inputs = served.post("/generate", {"inputs": "a cat sitting on", "parameters": {
        "max_new_tokens": 12, "temperature": 0.5, "top_p": 0.9, "do_sample": False, "return_full_text": False}})
    assert inputs.status_code == 200, inputs.text
    body = inputs.json()
    assert body["success"] is True and body["generated_text"] == body["response"]
    assert body["tokens_generated"] <= 12

    full = served.post("/generate", {"inputs": "a cat sitting on", "parameters": {
        "max_new_tokens": 12, "do_sample": False, "return_full_text": True}}).json()
    assert full["generated_text"] == "a cat sitting on" + body["response"]  # greedy: the same continuation

    messages = served.post("/generate", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).json()
    assert messages["success"] is True and "generated_text" not in messages


BAD_BODIES = [
    ({"max_tokens": 10}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": [1]}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "sfw_mode": "maybe"}, "sfw_mode"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "abc"}, "seed"),
    ({"messages": [{"role": "user", "content": "x" * 200_001}]}, "messages"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES)
@pytest.mark.parametrize("path", ["/chat", "/chat/unrestricted"])
def test_bad_input_is_400_naming_the_field(served, path, body, field):
    response = served.post(path, body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["success"] is False and answer["error"].startswith(field)


@pytest.mark.parametrize("path", ["/chat", "/enhance", "/generate", "/v1/chat/completions"])
def test_no_body_and_non_json_are_400(served, path):
    empty = served.session.post(served.url + path, headers=AUTH)
    assert empty.status_code == 400 and "body" in empty.text
    broken = served.session.post(served.url + path, data=b"{not json", headers={**AUTH, "Content-Type":
                                                                                "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.text
    array = served.post(path, [1, 2])
    assert array.status_code == 400


def test_other_routes_bad_input(served):
    assert "inputs" in served.post("/generate", {"inputs": ""}).json()["error"]
    assert served.post("/generate", {"inputs": "x", "parameters": "fast"}).json()["error"].startswith("parameters")
    bad = served.post("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -1}})
    assert bad.status_code == 400 and bad.json()["error"].startswith("parameters.max_new_tokens")
    assert served.post("/enhance", {"max_tokens": 5}).json()["error"].startswith("messages")
    assert served.post("/enhance", {"prompt": "  "}).json()["error"].startswith("prompt")


def test_auth(served, fresh_handler):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for key in (WAN_KEY, CHAT_KEY):
        assert served.post("/chat", body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert served.post("/chat", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert served.post("/chat", body, headers={"Authorization": CHAT_KEY}).status_code == 401  # no scheme
    assert served.post("/chat", body, headers=None).status_code == 401
    for path in ("/worker/info", "/debug/model", "/enhancement/info", "/v1/models"):
        assert served.get(path, headers=None).status_code == 401
    refused = served.post("/chat", body, headers=None).json()
    assert refused == {"success": False, "error": "missing or invalid API key"}

    anonymous = Served(fresh_handler(allow_anonymous=True))
    try:
        assert anonymous.post("/chat", body, headers=None).status_code == 200
        assert anonymous.post("/chat", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        anonymous.stop()


def test_worker_info_and_debug_model_show_no_paths_or_secrets(served, demo_models):
    for path in ("/worker/info", "/debug/model"):
        body = served.get(path).json()
        text = json.dumps(body)
        assert body["success"] is True and body["models"]["qwen_instruct"]["loaded"] is True
        assert "POST /chat" in body["endpoints"] and "continuous_batching" in body["capabilities"]
        assert str(demo_models["qwen_instruct"].parent) not in text and "/tmp" not in text
        assert WAN_KEY not in text and CHAT_KEY not in text
    detail = served.get("/debug/model").json()["models"]["qwen_instruct"]
    assert detail["dtype"] == "float32" and detail["device"] == "cpu" and detail["parameters"] > 0


def test_base_model_loads_on_first_use(served, handler):
    response = served.post("/chat", {"messages": [{"role": "user", "content": "hi"}], "model": "qwen_base",
                                     "max_tokens": 6})
    assert response.status_code == 200, response.text
    assert response.json()["model_info"]["model"] == "qwen_base"
    assert handler.status()["models"]["qwen_base"]["loaded"] is True


def test_no_model_is_503(fresh_handler):
    handler = fresh_handler(qwen_base_path=None)
    served = Served(handler)
    try:
        assert "qwen_instruct unloaded" in handler.unload("all")
        response = served.post("/chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert response.status_code == 503
        assert response.json()["success"] is False and "no chat model" in response.json()["error"]
        assert handler.load("instruct") == "qwen_instruct loaded"
        assert served.post("/chat", {"messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 4}).status_code == 200
    finally:
        served.stop()

"""OpenAI-compatible routes: completions (JSON and server-sent events) and the model list."""
from __future__ import annotations

import json
import re

MESSAGES = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "write "}, {"type": "text", "text": "a poem"}]}]


def events(response) -> list[str]:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: "):] for line in lines]


def test_completion(served):
    response = served.post("/v1/chat/completions", {"model": "qwen_instruct", "messages": MESSAGES,
                                                    "max_tokens": 20, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 20 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]
    assert served.post("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 3}).json()[
        "usage"]["completion_tokens"] <= 3


def test_streaming_matches_the_plain_completion(served):
    body = {"messages": MESSAGES, "max_tokens": 40, "temperature": 0}
    plain = served.post("/v1/chat/completions", body).json()
    response = served.post("/v1/chat/completions", {**body, "stream": True}, stream=True)
    assert response.status_code == 200
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"] for c in chunks}) == 1 for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 3, "the reply should arrive in several pieces"
    assert content.strip() == plain["choices"][0]["message"]["content"]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_openai_errors(served):
    bad = served.post("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("messages[0].role")
    assert served.post("/v1/chat/completions", {"messages": MESSAGES, "n": 2}).status_code == 400
    assert served.post("/v1/chat/completions", {"messages": MESSAGES, "temperature": 9}).status_code == 400
    assert served.post("/v1/chat/completions", {"messages": MESSAGES}, headers=None).status_code == 401


def test_models(served):
    body = served.get("/v1/models").json()
    assert body["object"] == "list"
    ids = {m["id"] for m in body["data"]}
    assert ids == {"qwen_instruct", "qwen_base"}
    assert not re.search(r"/tmp|/work", json.dumps(body))
    assert served.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401

"""Context truncation (oldest turns first; the system message and the newest turn stay) and sfw_mode."""
from __future__ import annotations

import json
import re

import pytest

from workers.chat.models import ModelName
from workers.chat.prompt import Message, Role, chat_prompt, text_prompt
from workers.chat.sfw import WordFilter
from workers.core.errors import InvalidJob

from .conftest import Served

SYSTEM = Message(Role.SYSTEM, "SYSTEM-RULES keep it short")


def conversation(turns: int) -> tuple[Message, ...]:
    roles = (Role.USER, Role.ASSISTANT)
    return (SYSTEM, *(Message(roles[i % 2], f"turn-{i:02d} a cat sitting on a red chair") for i in range(turns)),
            Message(Role.USER, "NEWEST question about the boat"))


def test_long_history_is_cut_from_the_oldest_turns(handler):
    model = handler.store.get(ModelName.INSTRUCT)
    messages = conversation(40)
    full = chat_prompt(model, messages, 100_000)
    assert not full.truncated
    budget = len(full.ids) // 2
    cut = chat_prompt(model, messages, budget)
    text = model.decode(cut.ids)
    assert len(cut.ids) <= budget and cut.truncated and 0 < cut.dropped_messages < 40
    assert "SYSTEM-RULES" in text and "NEWEST question" in text
    kept = [int(n) for n in re.findall(r"turn-(\d\d)", text)]
    assert kept == list(range(cut.dropped_messages, 40))  # a contiguous run of the newest turns
    # the fewest turns were dropped: one more would have fit
    kept_messages = messages[:1] + messages[1 + cut.dropped_messages:]
    assert chat_prompt(model, kept_messages, 100_000).ids == cut.ids
    assert len(chat_prompt(model, messages[:1] + messages[cut.dropped_messages:], 100_000).ids) > budget


def test_too_long_even_when_cut_is_a_clear_error(handler):
    model = handler.store.get(ModelName.INSTRUCT)
    with pytest.raises(InvalidJob, match="too long"):
        chat_prompt(model, (SYSTEM, Message(Role.USER, "word " * 400)), 100)
    raw = text_prompt(model, "a cat sitting on a red chair " * 20, 30)
    assert len(raw.ids) == 30 and raw.dropped_tokens > 0


def test_truncation_over_http(fresh_handler):
    handler = fresh_handler(chat_max_context_tokens=256, qwen_base_path=None)
    served = Served(handler)
    try:
        messages = [m.as_dict() for m in conversation(30)]
        response = served.post("/chat", {"messages": messages, "max_tokens": 32, "temperature": 0})
        assert response.status_code == 200, response.text
        info = response.json()["model_info"]
        assert info["context_truncated"] is True and info["dropped_messages"] > 0
        assert info["prompt_tokens"] <= 256 - 32
        too_long = served.post("/chat", {"messages": [{"role": "user", "content": "word " * 1000}]})
        assert too_long.status_code == 400 and too_long.json()["error"].startswith("messages are too long")
    finally:
        served.stop()


def test_word_filter_whole_words_only(tmp_path):
    words = WordFilter(["hell", "two words", "c++"])
    assert words.apply("Hell, hello shell HELL! hell-fire") == ("***, hello shell ***! ***-fire", 3)
    assert words.apply("two   words, twowords, two wordsmith") == ("***, twowords, two wordsmith", 1)
    assert words.apply("I like c++ and c+") == ("I like *** and c+", 1)
    default = WordFilter.from_file(None)
    assert default.apply("damn, that's damnation") == ("***, that's damnation", 1)
    path = tmp_path / "words.txt"
    path.write_text("# comment\nBoat  # trailing comment\n\n")
    assert WordFilter.from_file(path).apply("a boat, boats, BOAT") == ("a ***, boats, ***", 2)


def test_word_filter_streaming_never_splits_an_entry():
    words = WordFilter(["two words", "hell"])
    text = "say two  words then hell ok and hello"
    sent, out = 0, ""
    for end in range(1, len(text) + 1):
        cut = words.stream_cut(text[:end], sent)
        if cut > sent:
            out += words.apply(text[sent:cut])[0]
            sent = cut
    out += words.apply(text[sent:])[0]
    assert out == "say *** then *** ok and hello"


def test_sfw_mode_filters_the_reply_over_http(fresh_handler, tmp_path):
    """Filter a word the demo model really says: find one in a greedy reply, list it, ask again."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "temperature": 0}
    plain_handler = fresh_handler(qwen_base_path=None)
    served = Served(plain_handler)
    try:
        reply = served.post("/chat", body).json()["response"]
    finally:
        served.stop()
    candidates = [w for w in re.findall(r"(?<!\w)[A-Za-z]{3,}(?!\w)", reply)]
    assert candidates, f"no whole word in {reply!r}"
    word = candidates[0]
    words_file = tmp_path / "words.txt"
    words_file.write_text(word.upper() + "\n")

    handler = fresh_handler(qwen_base_path=None, chat_sfw_words_path=words_file)
    served = Served(handler)
    try:
        filtered = served.post("/chat", {**body, "sfw_mode": True}).json()
        assert filtered["response"] == WordFilter([word]).apply(reply)[0]
        assert not re.search(rf"(?<!\w){word}(?!\w)", filtered["response"], re.IGNORECASE)
        assert "***" in filtered["response"] and filtered["model_info"]["sfw_filtered_words"] >= 1
        assert served.post("/chat", body).json()["response"] == reply                    # sfw_mode off
        unrestricted = served.post("/chat/unrestricted", {**body, "sfw_mode": True}).json()
        assert unrestricted["response"] == reply
        stream = served.post("/v1/chat/completions", {**body, "stream": True, "sfw_mode": True}, stream=True)
        chunks = [json.loads(line[6:]) for line in stream.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed.strip() == filtered["response"]
    finally:
        served.stop()

"""The enhance use-case in one place (``ChatService.enhance``): ``POST /enhance`` and the ``chat_enhance`` job
give the same rewrite for the same input, and the chat modules above the engine form no import cycle (the
routes sit above the handler, the handler above the service; nothing imports back, ``TYPE_CHECKING`` included;
tests/test_architecture.py checks the whole tree)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_architecture import ROOT, edges, strongly_connected
from workers.chat.request import Fields
from workers.chat.service import Enhancement, Patience, enhanced_text

from .conftest import make_job

PROMPT = "a lighthouse at dusk"


def no_progress(fraction: float, message: str) -> None:
    return None


@pytest.mark.parametrize("model", ["qwen_instruct", "qwen_base"])
def test_the_route_and_the_job_give_the_same_enhancement(served, handler, model):
    config = {"max_tokens": 16, "temperature": 0, "seed": 11, "model": model}
    route = served.post("/enhance", {"prompt": PROMPT, **config})
    assert route.status_code == 200, route.text
    job = handler.run(make_job("chat_enhance", config, prompt=PROMPT), no_progress).metadata
    keys = ("enhanced_prompt", "original_prompt", "enhancement_source")
    assert {k: route.json()[k] for k in keys} == {k: job[k] for k in keys}
    assert job["original_prompt"] == PROMPT and job["enhancement_source"] == model
    direct = handler.chat.enhance(Fields({"prompt": PROMPT, **config}), Patience(timeout=60))
    assert direct.fields() == {k: job[k] for k in keys}


def test_the_rewrite_is_cleaned_and_an_empty_one_keeps_the_original():
    assert enhanced_text('  Enhanced prompt: "a red fox in snow"  ') == "a red fox in snow"
    assert enhanced_text("Prompt: 'a boat'") == "a boat"
    assert enhanced_text('""') == ""
    empty = Enhancement(reply=None, original="a dog", rewrite="")   # type: ignore[arg-type]
    assert empty.prompt == "a dog"


def test_no_chat_module_imports_one_that_imports_it_back():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        if a.startswith("workers/chat/") and b.startswith("workers/chat/"):
            graph.setdefault(a, set()).add(b)
    assert graph["workers/chat/api.py"] >= {"workers/chat/handler.py", "workers/chat/openai.py"}
    layer = {f"workers/chat/{name}.py" for name in ("__init__", "api", "openai", "handler", "service")}
    assert [cycle for cycle in strongly_connected(graph) if layer & set(cycle)] == []


@pytest.mark.parametrize("kind", ["chat", "sdxl", "wan"])
def test_handlers_know_nothing_of_http(kind):
    """Handlers raise typed errors (``InvalidJob``, ``WorkerError``); the HTTP layer maps them."""
    handler = Path("workers", kind, "handler.py").as_posix()
    assert (ROOT / handler).is_file()
    imported = {b for a, b in edges() if a == handler}
    assert not imported & {"common/http.py", f"workers/{kind}/api.py", f"workers/{kind}/routes.py",
                           f"workers/{kind}/openai.py"}, imported
    assert "flask" not in (ROOT / handler).read_text()

"""chat_queue jobs through ChatHandler.run, memory control and status."""
from __future__ import annotations

import json

import pytest

from workers.chat.models import ModelUnavailable
from workers.core.errors import ErrorType, InvalidJob
from workers.core.job import Queue

from .conftest import make_job

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a cat on a chair"}]


def progress_log():
    calls = []
    return calls, lambda fraction, message: calls.append((fraction, message))


def test_handler_identity(handler):
    assert handler.queue is Queue.CHAT and handler.kind == "chat"


def test_conversation_job(handler):
    calls, progress = progress_log()
    job = make_job("chat_conversation", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                                         "conversation_id": "c-1"})
    result = handler.run(job, progress)
    assert result.outputs == []
    meta = result.metadata
    assert isinstance(meta["response"], str) and meta["tokens_generated"] <= 12
    assert meta["model_used"] == "qwen_instruct" and meta["finish_reason"] in ("stop", "length")
    assert "conversation_id" not in meta and "unrestricted_mode" not in meta
    assert calls and calls[0][0] == 0.0
    json.dumps(meta)  # the callback body must serialise


def test_top_level_fields_and_prompt_only(handler):
    top = handler.run(make_job("chat_conversation", None, messages=MESSAGES, max_tokens=5), progress_log()[1])
    assert top.metadata["tokens_generated"] <= 5
    prompt_only = handler.run(make_job("admin_utilities", {"max_tokens": 5}, prompt="summarise the queue"),
                              progress_log()[1])
    assert isinstance(prompt_only.metadata["response"], str)


def test_unrestricted_job(handler):
    result = handler.run(make_job("chat_unrestricted", {"messages": MESSAGES, "max_tokens": 6, "sfw_mode": True}),
                         progress_log()[1])
    assert result.metadata["unrestricted_mode"] is True


def test_enhance_job(handler):
    result = handler.run(make_job("chat_enhance", {"max_tokens": 16}, prompt="a boat in a storm"),
                         progress_log()[1])
    meta = result.metadata
    assert meta["enhanced_prompt"] and meta["original_prompt"] == "a boat in a storm"
    assert meta["enhancement_source"] in ("qwen_instruct", "qwen_base")
    base = handler.run(make_job("chat_enhance", {"max_tokens": 8, "model": "qwen_base"}, prompt="a dog"),
                       progress_log()[1])
    assert base.metadata["enhancement_source"] == "qwen_base"


@pytest.mark.parametrize("config,field", [
    ({"messages": [], "max_tokens": 5}, "config.messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "config.messages[0].role"),
    ({"messages": MESSAGES, "max_tokens": 0}, "config.max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, "config.temperature"),
    ({"max_tokens": 5}, "messages"),
])
def test_bad_job_fields_are_invalid_job(handler, config, field):
    with pytest.raises(InvalidJob) as caught:
        handler.run(make_job("chat_conversation", config), progress_log()[1])
    assert caught.value.message.startswith(field)
    assert caught.value.error_type is ErrorType.INVALID_JOB and not caught.value.retryable


def test_top_level_bad_field_is_named(handler):
    with pytest.raises(InvalidJob, match=r"^top_p must be"):
        handler.run(make_job("chat_conversation", None, messages=MESSAGES, top_p=3), progress_log()[1])


def test_memory_control_and_status(fresh_handler, demo_models):
    handler = fresh_handler()
    with pytest.raises(InvalidJob, match="which must be instruct, base or all"):   # 400 on /memory/load
        handler.load("everything")
    with pytest.raises(InvalidJob):
        handler.unload("gpu")
    assert handler.status()["loaded_models"] == ["qwen_instruct"]
    assert handler.load("base") == "qwen_base loaded"
    assert handler.status()["loaded_models"] == ["qwen_instruct", "qwen_base"]
    assert handler.unload("instruct") == "qwen_instruct unloaded"
    # with the instruct model gone, an instruct request is served by the loaded base model (reported)
    result = handler.run(make_job("chat_conversation", {"messages": MESSAGES, "max_tokens": 4}), progress_log()[1])
    assert result.metadata["model_used"] == "qwen_base"
    assert handler.unload("all") == "qwen_instruct was not loaded; qwen_base unloaded"
    assert handler.status()["loaded_models"] == [] and handler.status()["ready"] is False
    with pytest.raises(ModelUnavailable) as unavailable:
        handler.run(make_job("chat_conversation", {"messages": MESSAGES, "max_tokens": 4}), progress_log()[1])
    assert unavailable.value.error_type is ErrorType.WORKER_UNAVAILABLE and unavailable.value.retryable
    assert handler.load("all") == "qwen_instruct loaded; qwen_base loaded"
    status = json.dumps(handler.status(detail=True))
    assert str(demo_models["qwen_instruct"]) not in status and "/tmp" not in status
    assert json.loads(status)["device"] == "cpu"


def test_preload_setting_loads_base_at_setup(fresh_handler):
    assert fresh_handler(qwen_base_preload=True).status()["loaded_models"] == ["qwen_instruct", "qwen_base"]


def test_setup_without_any_model_path_is_fatal(fresh_handler):
    from workers.core.errors import FatalWorkerError
    with pytest.raises(FatalWorkerError, match="QWEN_INSTRUCT_PATH"):
        fresh_handler(qwen_instruct_path=None, qwen_base_path=None)

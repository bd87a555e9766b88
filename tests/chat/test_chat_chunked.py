"""Chunked prefill (prefill.py ``Partial``, ``SlotBatch.advance``): a long prompt that arrives while rows
decode is prefilled a chunk per step. On the tiny demo Qwen in fp32 on the CPU: the same tokens as the
DynamicCache path with every late long prompt chunked, other rows decoding between its chunks, a chunked
prompt on top of a prefix-cache hit, and through the engine a cancelled and a failing chunked request that end
alone and leave nothing counted as active."""
from __future__ import annotations

import time

import pytest
import torch

from workers.chat.batch import DecodeBatch
from workers.chat.engine import Engine
from workers.chat.generation import GenerationRequest
from workers.chat.models import LoadedModel, ModelName, SingleModel
from workers.chat.sampling import SamplingParams
from workers.chat.slot_batch import SlotBatch
from workers.core.errors import WorkerError

from .conftest import drive
from .test_chat_slots import workload


@pytest.fixture(scope="module")
def loaded(handler):
    return handler.store.get(ModelName.INSTRUCT)


def ids(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_late_long_prompts_are_chunked_and_decode_the_same_tokens(loaded):
    vocab = loaded.model.config.vocab_size
    chunked = SlotBatch(loaded, slots=8, cuda_graphs=False, prefill_chunk=64)
    chunks: list[int] = []
    original = chunked.advance

    def counted():
        chunks.append(len(chunked.pending))
        return original()
    chunked.advance = counted
    assert drive(chunked, workload(vocab)) == drive(DecodeBatch(loaded), workload(vocab))
    # the 500- and 1010-token prompts arrive while rows decode: 8 and 16 chunks, rows decoding in between
    assert len(chunks) >= 8 + 16 and not chunked.pending


def test_a_chunked_prompt_on_top_of_a_prefix_hit(loaded):
    vocab = loaded.model.config.vocab_size
    cached = SlotBatch(loaded, slots=4, cuda_graphs=False, prefix_tokens=4096, prefill_chunk=32)
    plain = SlotBatch(loaded, slots=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    first = ids(vocab, 90, 1)
    (reply,) = drive(cached, {0: [GenerationRequest(ModelName.INSTRUCT, first, greedy)]})
    long = first + reply + ids(vocab, 150, 2)
    plan = lambda: {0: [GenerationRequest(ModelName.INSTRUCT, ids(vocab, 20, 3), greedy)],  # noqa: E731
                    1: [GenerationRequest(ModelName.INSTRUCT, long, greedy)]}
    assert drive(cached, plan()) == drive(plain, plan())
    assert cached.prefix.counters["tokens_reused"] >= 96   # 6 blocks of the first turn, then 150+ in chunks


def test_through_the_engine_a_cancelled_and_a_failing_chunked_request_end_alone(loaded):
    vocab = loaded.model.config.vocab_size
    endless = LoadedModel(ModelName.INSTRUCT, loaded.model, loaded.tokenizer, loaded.device, frozenset(),
                          loaded.max_context)   # no stop token: every request makes its max_tokens
    engine = Engine(SingleModel(endless), max_batch=4, prefill_chunk=16)
    engine.start()
    try:
        runner = GenerationRequest(ModelName.INSTRUCT, ids(vocab, 10, 4), SamplingParams(temperature=0.0,
                                                                                       max_tokens=200))
        engine.submit(runner)
        while not engine.stats()["active"]:
            time.sleep(0.01)
        broken = ids(vocab, 300, 5)
        broken[250] = vocab + 7                           # an id past the vocabulary: its chunk raises
        failing = GenerationRequest(ModelName.INSTRUCT, broken, SamplingParams(temperature=0.0, max_tokens=5))
        cancelled = GenerationRequest(ModelName.INSTRUCT, ids(vocab, 400, 6), SamplingParams(max_tokens=5))
        good = GenerationRequest(ModelName.INSTRUCT, ids(vocab, 120, 7), SamplingParams(temperature=0.0,
                                                                                      max_tokens=5))
        for request in (failing, cancelled, good):
            engine.submit(request)
        cancelled.cancel()
        with pytest.raises(WorkerError):
            engine.wait(failing, 60)
        assert len(engine.wait(good, 60).token_ids) == 5
        assert len(engine.wait(runner, 60).token_ids) == 200
        deadline = time.monotonic() + 10
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["active"] == 0 and stats["decode"][ModelName.INSTRUCT.value]["pending"] == 0
        assert cancelled.future.cancelled() or cancelled.future.done()
    finally:
        engine.stop()

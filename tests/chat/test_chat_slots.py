"""The static slot-cache decode path (slot_batch.py) against the DynamicCache path (batch.py): the same tokens,
token for token, on the tiny demo Qwen in fp32 on the CPU, with requests joining mid-decode, rows finishing at
different times (slots freed and refilled, rows moved), batch padding to buckets, a row crossing a span bucket,
and sampled rows with seeds and penalties. On CUDA, the CUDA-graph replay against the eager static step."""
from __future__ import annotations

import pytest
import torch

from workers.chat.batch import DecodeBatch
from workers.chat.engine import Engine
from workers.chat.generation import GenerationRequest
from workers.chat.models import LoadedModel, ModelName, SingleModel, load_model
from workers.chat.sampling import SamplingParams
from workers.chat.slot_batch import SlotBatch, bucket, buckets
from workers.core.errors import InvalidJob

from .conftest import drive

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)




@pytest.fixture(scope="module")
def loaded(handler) -> LoadedModel:
    model = handler.store.get(ModelName.INSTRUCT)
    assert model is not None and model.dtype == torch.float32 and model.device.type == "cpu"
    return model


def ids(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def workload(vocab: int) -> dict[int, list[GenerationRequest]]:
    """Step index -> requests admitted before that step (fresh objects on every call)."""
    def request(length: int, seed: int, sampling: SamplingParams = GREEDY) -> GenerationRequest:
        return GenerationRequest(ModelName.INSTRUCT, ids(vocab, length, seed), sampling)

    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=30, presence_penalty=0.5,
                             frequency_penalty=0.4, seed=11)
    return {
        0: [request(30, 1), request(12, 2, SamplingParams(temperature=0.0, max_tokens=6))],
        3: [request(50, 3, SamplingParams(temperature=0.0, max_tokens=25, frequency_penalty=1.5)),
            request(7, 4, sampled)],
        # rows crossing span buckets mid-decode: 512 -> 2048 eagerly, 1024 -> 4096 with CUDA graphs
        5: [request(500, 5, SamplingParams(temperature=0.0, max_tokens=30))],
        9: [request(20, 6, SamplingParams(temperature=0.0, max_tokens=3)), request(40, 7), request(9, 8)],
        20: [request(15, 9, SamplingParams(temperature=0.0, max_tokens=12))],
        40: [request(1010, 10, SamplingParams(temperature=0.0, max_tokens=30)), request(33, 12)],
    }



def test_buckets():
    assert buckets(16, 1, 2) == [1, 2, 4, 8, 16] and buckets(12, 1, 2) == [1, 2, 4, 8, 12]
    assert buckets(8192, 1024, 4) == [1024, 4096, 8192] and buckets(4096, 1024, 4) == [1024, 4096]
    assert buckets(512, 512, 4) == [512]
    assert bucket(3, [1, 2, 4, 8]) == 4 and bucket(1025, [1024, 4096]) == 4096


def test_slot_path_matches_dynamic_cache_path(loaded):
    vocab = loaded.model.config.vocab_size
    seen: list[tuple[int, int]] = []
    slots = SlotBatch(loaded, slots=8, cuda_graphs=False, decode_ahead=True)

    def record(batch: SlotBatch) -> None:   # the (batch bucket, span bucket) each step runs at
        seen.append((bucket(len(batch.rows), batch.batch_buckets), bucket(max(batch._lengths) + 1, batch.span_buckets)))

    static = drive(slots, workload(vocab), record)
    dynamic = drive(DecodeBatch(loaded), workload(vocab))
    assert [len(t) for t in static] == [len(t) for t in dynamic]
    assert static == dynamic
    assert max(len(t) for t in static) >= 25 and len({len(t) for t in static}) >= 4   # finished at different times
    assert {rows for rows, _ in seen} >= {2, 4, 8} and {span for _, span in seen} == {128, 512, 2048}
    assert slots.path == "static_eager" and not slots.rows
    assert slots.ahead_steps["used"] > 50 and slots.ahead_steps["wasted"] >= 5   # steps launched ahead, and dropped
    assert int(slots._positions.abs().sum()) == 0 and int(slots._tokens.abs().sum()) == 0   # free slots reset


def test_slot_path_alone_equals_in_batch(loaded):
    """Every request of the workload decoded alone in a fresh slot batch gives its in-batch tokens."""
    vocab = loaded.model.config.vocab_size
    together = drive(SlotBatch(loaded, slots=8, cuda_graphs=False), workload(vocab))
    plan = workload(vocab)
    alone = [drive(SlotBatch(loaded, slots=8, cuda_graphs=False), {0: [r]})[0]
             for step in sorted(plan) for r in plan[step]]
    assert alone == together


def test_engine_paths_agree_under_concurrency(loaded):
    """Through the real loop thread: concurrent submissions, static cache on and off, and on with decode ahead
    and chunked prefill, same tokens."""
    vocab = loaded.model.config.vocab_size
    results = {}
    for static, options in ((True, {}), (False, {}), ("ahead", {"decode_ahead": True, "prefill_chunk": 16})):
        engine = Engine(SingleModel(loaded), max_batch=6, static_cache=bool(static), **options)
        engine.start()
        try:
            requests = [GenerationRequest(ModelName.INSTRUCT, ids(vocab, 10 + 7 * i, 20 + i),
                                          SamplingParams(temperature=0.0, max_tokens=8 + 5 * i)) for i in range(9)]
            for r in requests:
                engine.submit(r)
            results[static] = [engine.wait(r, 60).token_ids for r in requests]
            path = engine.stats()["decode"][ModelName.INSTRUCT.value]["path"]
            assert path == ("static_eager" if static else "dynamic_cache")
            assert engine.stats()["largest_batch"] >= 2
        finally:
            engine.stop()
    assert results[True] == results[False] == results["ahead"]


def test_handler_uses_the_slot_cache(handler):
    decode = handler.engine.stats()["decode"]
    assert decode[ModelName.INSTRUCT.value]["path"] == "static_eager"   # CPU: no graphs, static cache
    assert decode[ModelName.INSTRUCT.value]["slots"] == handler.engine.max_batch


def test_unsupported_attention_falls_back_to_dynamic_cache(demo_models):
    eager = load_model(ModelName.INSTRUCT, demo_models["qwen_instruct"], torch.device("cpu"), 512)
    eager.model.config._attn_implementation = "eager"   # the slot mask is an sdpa boolean mask
    engine = Engine(SingleModel(eager), max_batch=2)
    engine.start()
    try:
        assert engine.prepare(ModelName.INSTRUCT)["path"] == "dynamic_cache"
        out = engine.run(GenerationRequest(ModelName.INSTRUCT, [5, 6, 7], SamplingParams(temperature=0.0,
                                                                                         max_tokens=4)), 30)
        assert 1 <= len(out.token_ids) <= 4
    finally:
        engine.stop()


def test_overlong_prompt_fails_alone(loaded):
    batch = SlotBatch(loaded, slots=2, cuda_graphs=False)
    with pytest.raises(InvalidJob), torch.inference_mode():
        batch.admit([GenerationRequest(ModelName.INSTRUCT, [1] * (loaded.max_context + 1), GREEDY)])
    assert not batch.rows and int(batch._positions.sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager_static(demo_models):
    cuda = load_model(ModelName.INSTRUCT, demo_models["qwen_instruct"], torch.device("cuda"), 4096)
    vocab = cuda.model.config.vocab_size
    graphed = SlotBatch(cuda, slots=8, cuda_graphs=True)
    graphed.warm_up()
    with_graphs = drive(graphed, workload(vocab))
    assert graphed.path == "cuda_graphs", graphed.describe()
    assert graphed.graphs is not None and graphed.graphs.replays > 0
    assert with_graphs == drive(SlotBatch(cuda, slots=8, cuda_graphs=False), workload(vocab))
    ahead = SlotBatch(cuda, slots=8, cuda_graphs=True, decode_ahead=True)   # pinned copy + event, graph replays
    assert drive(ahead, workload(vocab)) == with_graphs
    assert ahead.ahead_steps["used"] > 50 and ahead.path == "cuda_graphs"

"""The chat engine's blast radius (review #11 chat half, #12, #13): one bad row, one failed admission, one failed
batch set-up, one OOM or one failed graph capture costs its own request (or its own bucket), never the batch
or the fast path; a caller that goes away (a closed socket, a cancelled job, a deadline) stops its decoding; a
full waiting line is refused at once with 503 + Retry-After.

Engine-level tests drive a private ``Engine`` over the session's tiny instruct model (stop tokens removed, so
every request decodes to its max_tokens); faults are monkeypatched into the real code path they stand for
(sampling, the prefill merge, the batch set-up, a decode step). Socket tests run a real ``python -m workers
chat`` process under gunicorn with slowed decode steps (slow.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import requests
import torch

import workers.chat.batch as batch_module
import workers.chat.engine as engine_module
import workers.chat.slot_batch as slot_module
from workers.chat.api import status_of
from workers.chat.batch import DecodeBatch
from workers.chat.engine import Engine
from workers.chat.generation import GenerationRequest
from workers.chat.graphs import DecodeGraphs
from workers.chat.models import LoadedModel, ModelName, SingleModel
from workers.chat.prompt import Message, Role, chat_prompt
from workers.chat.sampling import SamplingParams
from workers.chat.settings import ChatSettings
from workers.chat.slot_batch import SlotBatch
from workers.core.errors import ErrorType, JobCancelled, RetryableError, WorkerError

from .conftest import AUTH, Served, engine_stats, eventually, make_job, raw_post
from .slow import slowed

INSTRUCT = ModelName.INSTRUCT
POEM = "write a poem"          # the demo instruct model's greedy reply to this runs 300+ tokens without a stop


@pytest.fixture(scope="module")
def endless(handler) -> LoadedModel:
    """The tiny instruct model without stop tokens: every request runs to its max_tokens."""
    return dataclasses.replace(handler.store.get(INSTRUCT), stop_ids=frozenset())


@pytest.fixture
def engines(endless) -> Any:
    made: list[Engine] = []

    def make(static: bool = True, **kwargs: Any) -> Engine:
        engine = Engine(SingleModel(endless), max_batch=4, static_cache=static, **kwargs)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop()


def oom_once(monkeypatch, cls: type, method: str) -> list[bool]:
    """Make ``cls.method`` raise a CUDA OOM on its first call only; the returned list is non-empty once it has."""
    original, failed = getattr(cls, method), []

    def failing(self, *args, **kwargs):
        if not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)
    return failed


def request(loaded: LoadedModel, seed: int, max_tokens: int = 40, temperature: float = 0.0,
            text: str = POEM) -> GenerationRequest:
    ids = chat_prompt(loaded, (Message(Role.USER, f"{text} {seed}"),), 1000).ids
    return GenerationRequest(INSTRUCT, ids, SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                                           seed=seed))


def started(engine: Engine, req: GenerationRequest, tokens: int = 5) -> GenerationRequest:
    """Submit ``req`` and return once it has produced ``tokens`` tokens (it is decoding in the batch)."""
    seen: list[int] = []
    req.on_tokens = seen.extend
    engine.submit(req)
    deadline = time.monotonic() + 30
    while len(seen) < tokens:
        assert time.monotonic() < deadline, "the request did not start decoding"
        time.sleep(0.001)
    return req


def wrap_choice(monkeypatch, wrapper: Callable[..., torch.Tensor]) -> None:
    """Route both decode paths' token choice through ``wrapper(original, logits, counts, rows, generators)``."""
    for module in (batch_module, slot_module):
        original = module.next_tokens
        monkeypatch.setattr(module, "next_tokens",
                            lambda *args, _original=original: wrapper(_original, *args))


# ---------------------------------------------------------------------------------------------------- #12
@pytest.mark.parametrize("static", [True, False], ids=["slot_cache", "dynamic_cache"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_row_with_nan_logits_fails_alone(engines, endless, monkeypatch, static, temperature):
    """#12(a): NaN logits in one row (mid-decode) fail that request; its batch-mate finishes with the tokens it
    gives alone. Today the sampled row's ``torch.multinomial`` raises and the whole batch fails; a greedy NaN
    row "completes" with garbage."""
    engine = engines(static)
    alone = engine.run(request(endless, 1, 30), 60).token_ids
    calls = itertools.count()

    def poison(original, logits, counts, rows, generators):
        bad = [i for i, g in enumerate(generators) if g.initial_seed() == 666]
        if next(calls) >= 2 and bad:     # admission and the first step are clean; then this row turns NaN
            logits = logits.clone()
            logits[bad] = float("nan")
        return original(logits, counts, rows, generators)

    wrap_choice(monkeypatch, poison)
    good, bad = request(endless, 1, 30), request(endless, 666, 30, temperature)
    engine.submit(good)
    engine.submit(bad)
    with pytest.raises(WorkerError) as caught:
        engine.wait(bad, 60)
    assert "not finite" in caught.value.message
    assert engine.wait(good, 60).token_ids == alone
    assert engine.stats()["active"] == 0 and engine.running


def test_an_exception_in_one_rows_sampling_fails_that_row_only(engines, endless, monkeypatch):
    """#12(a): ``torch.multinomial`` raising for one row (its generator) fails that request only."""
    engine = engines(True)
    alone = engine.run(request(endless, 2, 30, temperature=1.0), 60).token_ids
    multinomial = torch.multinomial

    def failing(probs, n, generator=None, **kwargs):
        if generator is not None and generator.initial_seed() == 667:
            raise RuntimeError("sampling failed for this row")
        return multinomial(probs, n, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "multinomial", failing)
    good, bad = request(endless, 2, 30, temperature=1.0), request(endless, 667, 30, temperature=1.0)
    engine.submit(good)
    engine.submit(bad)
    with pytest.raises(WorkerError):
        engine.wait(bad, 60)
    assert engine.wait(good, 60).token_ids == alone


def test_a_failed_dynamic_cache_admission_leaves_the_running_batch_alone(engines, endless, monkeypatch):
    """#12(b): choosing the first token of B fails after B's prefill; A (decoding) is untouched, B fails, a later
    request runs. Today B's rows stay merged with a failed future: when they finish, ``set_result`` raises
    InvalidStateError in ``_settle`` and the loop fails every request."""
    engine = engines(False)
    alone = engine.run(request(endless, 3, 60), 60).token_ids

    def fail_admission(original, logits, counts, rows, generators):
        if any(g.initial_seed() == 777 for g in generators):
            raise RuntimeError("first-token choice failed")
        return original(logits, counts, rows, generators)

    wrap_choice(monkeypatch, fail_admission)
    running = started(engine, request(endless, 3, 60))
    with pytest.raises(WorkerError):
        engine.run(request(endless, 777, 10), 30)
    assert engine.wait(running, 60).token_ids == alone
    assert len(engine.run(request(endless, 4, 5), 30).token_ids) == 5


def test_an_oom_in_the_middle_of_a_merge_leaves_the_running_batch_alone(engines, endless, monkeypatch):
    """#12(b): an OOM on the third padding copy of B's merge (after the mask, among the layers) fails B with a
    retryable OOM; A finishes with its own tokens. Today the mask and some layers already hold B's rows: the
    next step raises a shape error and fails every running request."""
    engine = engines(False)
    alone = engine.run(request(endless, 5, 60), 60).token_ids
    pad_left, calls = batch_module._pad_left, itertools.count(1)

    def oom_on_third(tensor, width, dim):
        if next(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return pad_left(tensor, width, dim)

    running = started(engine, request(endless, 5, 60))
    monkeypatch.setattr(batch_module, "_pad_left", oom_on_third)
    with pytest.raises(RetryableError) as caught:
        engine.run(request(endless, 6, 10, text="hi"), 30)   # a different length: the merge pads
    assert caught.value.error_type is ErrorType.OOM_ERROR
    assert engine.wait(running, 60).token_ids == alone


def test_a_failing_batch_setup_fails_its_requests_at_once_with_503(engines, endless, monkeypatch):
    """#12(c): ``_new_batch`` raising (a CUDA error in mem_get_info, an OOM building the batch) fails the admitted
    group at once with a 503-type error. Today the group is out of the waiting line and never resolved: its
    callers wait for their timeout (504)."""
    engine = engines(True)

    def broken(loaded):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "_new_batch", broken)
    with pytest.raises(WorkerError) as caught:
        engine.run(request(endless, 7, 5), 10)
    assert caught.value.error_type is ErrorType.WORKER_UNAVAILABLE and status_of(caught.value) == 503
    monkeypatch.undo()
    assert len(engine.run(request(endless, 7, 5), 30).token_ids) == 5


# ---------------------------------------------------------------------------------------------------- #13
def test_the_failed_batch_is_freed_before_the_next_one_is_built(engines, endless, monkeypatch):
    """#13: after an OOM in a decode step, nothing references the dropped batch when the next one is set up (so
    its KV cache is free memory by then). Today ``_loop``'s loop variable still holds it."""
    engine = engines(True)
    engine.run(request(endless, 8, 3), 30)
    ref = weakref.ref(engine._batches[INSTRUCT])
    oom_once(monkeypatch, SlotBatch, "step")
    alive_at_build: list[bool] = []
    build = engine._new_batch

    def recording(loaded):
        alive_at_build.append(ref() is not None)
        return build(loaded)

    monkeypatch.setattr(engine, "_new_batch", recording)
    with pytest.raises(RetryableError) as caught:
        engine.run(request(endless, 9, 20), 30)
    assert caught.value.error_type is ErrorType.OOM_ERROR and status_of(caught.value) == 503
    assert len(engine.run(request(endless, 10, 5), 30).token_ids) == 5
    assert alive_at_build == [False]
    assert engine.stats()["decode"][INSTRUCT.value]["path"] == "static_eager"


def test_after_a_slot_cache_failure_the_engine_returns_to_the_slot_cache(engines, endless, monkeypatch):
    """#13: a slot cache that cannot be set up once (OOM in its warm-up) serves that request on the DynamicCache
    path, and a later request gets the slot cache again. Today the fallback batch is kept for good."""
    monkeypatch.setattr(engine_module, "SLOT_RETRY_SECONDS", 0.0, raising=False)
    failed = oom_once(monkeypatch, SlotBatch, "warm_up")
    engine = engines(True)
    assert len(engine.run(request(endless, 11, 5), 30).token_ids) == 5
    assert failed and engine.stats()["decode"][INSTRUCT.value]["path"] == "dynamic_cache"
    assert len(engine.run(request(endless, 12, 5), 30).token_ids) == 5
    assert engine.stats()["decode"][INSTRUCT.value]["path"] == "static_eager"


def test_free_memory_counts_the_allocators_cached_blocks(monkeypatch):
    """#13: what a new KV cache can use = the driver's free memory + what PyTorch holds cached but unallocated
    (the dropped batch's blocks sit there until empty_cache). Today only mem_get_info's free is counted."""
    gb = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gb)
    from workers.chat.memory import free_bytes

    assert free_bytes(torch.device("cuda", 0)) == 9 * gb


class EagerReplay:
    """The capture step of DecodeGraphs with the CUDA part replaced by an eager re-run (CPU tests): "replaying"
    runs the recorded forward again into the same output buffer."""

    def __init__(self, forward: Callable[[], torch.Tensor]):
        self.forward = forward
        self.out = forward().clone()

    def replay(self) -> None:
        self.out.copy_(self.forward())


def test_a_failed_capture_disables_only_its_bucket_and_is_retried_within_a_budget(monkeypatch):
    """#13: one bucket's capture failing (e.g. a lazy capture of a longer span under memory pressure) leaves the
    other buckets on graphs; the failed bucket is retried later, at most ``CAPTURE_ATTEMPTS`` times. Today the
    first failure disables graphs for every bucket, for good."""
    import workers.chat.graphs as graphs_module

    monkeypatch.setattr(graphs_module, "CAPTURE_RETRY_SECONDS", 0.0, raising=False)
    failing = {(1, 4096)}
    attempts: list[tuple[int, int]] = []

    def capture(self, key, forward):
        attempts.append(key)
        if key in failing:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        graph = EagerReplay(forward)
        return graph, graph.out

    monkeypatch.setattr(DecodeGraphs, "_capture", capture, raising=False)
    graphs = DecodeGraphs(torch.device("cpu"))
    x = torch.arange(4.0)

    def forward() -> torch.Tensor:
        return x * 2

    assert graphs.run((1, 1024), forward).tolist() == [0, 2, 4, 6]
    assert graphs.run((1, 4096), forward).tolist() == [0, 2, 4, 6]     # eager: its capture failed
    x.add_(1)
    assert graphs.run((1, 1024), forward).tolist() == [2, 4, 6, 8]     # still a replay of its graph
    assert graphs.usable and graphs.keys == [(1, 1024)]
    for _ in range(10):
        graphs.run((1, 4096), forward)
    assert attempts.count((1, 4096)) == graphs_module.CAPTURE_ATTEMPTS
    failing.clear()
    graphs.run((1, 4096), forward)
    assert attempts.count((1, 4096)) == graphs_module.CAPTURE_ATTEMPTS   # the budget is spent: eager for good
    assert "(1, 4096)" in json.dumps(graphs.describe()["failed"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_after_an_oom_in_a_step_the_next_request_replays_graphs_again(demo_models, monkeypatch):
    """#13 on CUDA: one OOM in a graphed decode step; the next request runs on the CUDA-graph path again."""
    from workers.chat.models import load_model

    cuda = dataclasses.replace(load_model(INSTRUCT, demo_models["qwen_instruct"], torch.device("cuda"), 4096),
                               stop_ids=frozenset())
    engine = Engine(SingleModel(cuda), max_batch=4)
    engine.start()
    try:
        assert engine.prepare(INSTRUCT)["path"] == "cuda_graphs"
        oom_once(monkeypatch, SlotBatch, "step")
        with pytest.raises(RetryableError):
            engine.run(request(cuda, 1, 20), 60)
        assert len(engine.run(request(cuda, 2, 20), 60).token_ids) == 20
        decode = engine.stats()["decode"][INSTRUCT.value]
        assert decode["path"] == "cuda_graphs" and decode["replays"] > 0
    finally:
        engine.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_failed_capture_of_one_bucket_keeps_the_others(demo_models, monkeypatch):
    """#13 on CUDA: the capture of the batch-1 bucket fails; batch-2 requests still replay graphs."""
    from workers.chat.models import load_model

    cuda = dataclasses.replace(load_model(INSTRUCT, demo_models["qwen_instruct"], torch.device("cuda"), 4096),
                               stop_ids=frozenset())
    capture = DecodeGraphs._capture

    def failing(self, key, forward):
        if key[0] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return capture(self, key, forward)

    monkeypatch.setattr(DecodeGraphs, "_capture", failing)
    engine = Engine(SingleModel(cuda), max_batch=4)
    engine.start()
    try:
        engine.prepare(INSTRUCT)
        assert len(engine.run(request(cuda, 1, 10), 60).token_ids) == 10        # eager at batch 1
        pair = [request(cuda, 2, 10), request(cuda, 3, 10)]
        for r in pair:
            engine.submit(r)
        assert [len(engine.wait(r, 60).token_ids) for r in pair] == [10, 10]
        decode = engine.stats()["decode"][INSTRUCT.value]
        assert decode["path"] == "cuda_graphs" and decode["replays"] > 0
        assert all(key[0] != 1 for key in decode["graphs"])
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------------- #11
def test_the_request_deadline_defaults_under_the_proxy_limit():
    """#11: non-streaming requests get a server-side deadline below RunPod's 100 s proxy limit (was 300 s)."""
    assert ChatSettings.from_env({}).chat_request_timeout_seconds == 60.0
    assert ChatSettings.from_env({}).chat_max_waiting == 8


@pytest.fixture
def slow_steps(monkeypatch) -> None:
    for batch in (SlotBatch, DecodeBatch):
        monkeypatch.setattr(batch, "step", slowed(batch.step, 0.05))


def test_a_request_past_its_deadline_gets_504_and_stops_decoding(fresh_handler, slow_steps):
    handler = fresh_handler(chat_request_timeout_seconds=1.0)
    served = Served(handler)
    try:
        response = served.post("/chat", {"messages": [{"role": "user", "content": POEM}], "max_tokens": 400,
                                         "temperature": 0})
        assert response.status_code == 504, response.text
        assert response.json() == {"success": False, "error": "generation did not finish within 1 s"}
        assert eventually(lambda: handler.engine.stats()["active"] == 0, 5)
    finally:
        served.stop()


def test_a_full_waiting_line_is_refused_at_once_with_503_and_retry_after(fresh_handler, slow_steps):
    """#11 load shedding: one row running, one waiting (CHAT_MAX_WAITING=1): the next request is answered 503
    with Retry-After at once instead of queueing behind them. Today it waits."""
    handler = fresh_handler(chat_max_batch=1, chat_max_waiting=1)
    served = Served(handler)
    body = {"messages": [{"role": "user", "content": POEM}], "max_tokens": 60, "temperature": 0}
    stats = handler.engine.stats
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(served.post("/chat", body).status_code))
               for _ in range(2)]
    try:
        threads[0].start()
        assert eventually(lambda: stats()["active"] == 1)
        threads[1].start()
        assert eventually(lambda: stats()["waiting"] == 1)
        refused = served.post("/chat", body)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "waiting" in refused.json()["error"] and refused.json()["success"] is False
        for thread in threads:
            thread.join(60)
        assert results == [200, 200]
        assert stats()["shed"] == 1
    finally:
        served.stop()


def test_requests_that_free_rows_can_take_are_never_shed(engines, endless):
    """The line counts only requests that must wait for a row: with 4 rows and CHAT_MAX_WAITING 0, four
    requests submitted at once all run; a fifth, with every row taken, is refused."""
    engine = engines(True, max_waiting=0)
    burst = [request(endless, 20 + i, 200) for i in range(4)]
    for r in burst:
        engine.submit(r, shed=True)
    with pytest.raises(RetryableError) as caught:
        engine.submit(request(endless, 30, 5), shed=True)
    assert caught.value.error_type is ErrorType.WORKER_UNAVAILABLE and caught.value.delay > 0
    assert [len(engine.wait(r, 60).token_ids) for r in burst] == [200] * 4
    assert engine.stats()["shed"] == 1


def test_a_chat_job_stops_decoding_when_the_runner_cancels_it(fresh_handler, slow_steps):
    """#11/#4: a chat job polls the runner's progress while it waits; ``JobCancelled`` from progress (its
    deadline) cancels the engine request and propagates. Today progress is called once, before generating, and
    the job decodes to the end."""
    handler = fresh_handler()
    began, calls = time.monotonic(), []

    def progress(fraction: float, message: str) -> None:
        calls.append(message)
        if time.monotonic() - began > 1.0:
            raise JobCancelled("job chat_conversation passed its 1 s deadline")

    job = make_job("chat_conversation", {"messages": [{"role": "user", "content": POEM}], "max_tokens": 400,
                                         "temperature": 0})
    with pytest.raises(JobCancelled):
        handler.run(job, progress)
    assert len(calls) >= 2
    assert eventually(lambda: handler.engine.stats()["active"] == 0, 5)
    assert handler.engine.stats()["completed"] == 0


def test_a_client_that_disconnects_stops_its_decoding_under_gunicorn(chat_worker):
    """#11: a non-streaming /chat whose client closes its socket mid-generation is cancelled within a wait slice
    or so (the request thread peeks at ``gunicorn.socket``). Today it decodes to max_tokens (here about 20 s)."""
    worker = chat_worker(TEST_CHAT_STEP_DELAY_SECONDS="0.05")
    body = {"messages": [{"role": "user", "content": POEM}], "max_tokens": 400, "temperature": 0}
    sock = raw_post(worker.url, "/chat", body)
    assert eventually(lambda: engine_stats(worker.url)["active"] == 1, 30)
    sock.close()
    gone = time.monotonic()
    assert eventually(lambda: engine_stats(worker.url)["active"] == 0, 8), "the abandoned request kept decoding"
    print(f"decoding stopped {time.monotonic() - gone:.2f} s after the client closed its socket")
    stats = engine_stats(worker.url)
    assert stats["completed"] == 0
    # the worker still serves: a normal request right after
    ok = requests.post(f"{worker.url}/chat", json={**body, "max_tokens": 3}, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["tokens_generated"] <= 3

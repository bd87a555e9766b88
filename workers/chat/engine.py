"""The generation loop: one thread owns the models' forward passes; everyone else submits and waits.

HTTP requests and queue jobs call ``submit(request) -> Future`` (or ``run(request, timeout)``). Between two
decode steps the loop admits waiting requests (prefilled together, merged into the running batch of their
model), steps every running batch once, hands new tokens to streams and completes finished requests. So
requests join and leave a running batch continuously; no lock is held for a generation.

Each model's running rows live in a ``SlotBatch`` (static slot KV cache, decode step replayed as a CUDA graph
per batch bucket on CUDA; slot_batch.py) when ``static_cache`` is on and the model allows it, else in a
``DecodeBatch`` (DynamicCache, eager; batch.py). A batch that cannot get its cache falls back to the latter,
and the slot cache is tried again once the fallback is idle (``SLOT_RETRY_SECONDS``, doubling).

Failures stay as small as they can: a row with non-finite scores or a failed sampling fails its request only
(sampling.py); a failed admission fails the admitted group only; a failed batch set-up fails the group at once
with a retryable 503; a failed decode step fails that batch's requests and drops the batch, whose memory is
unreferenced before the next batch is measured. Waiting callers (``wait``) give up on their deadline or when
their ``check`` raises (the HTTP client went away, the job was cancelled); their row leaves the batch before
the next step. ``submit(shed=True)`` refuses at once when ``max_waiting`` requests already wait for a row.

Why not transformers' ``ContinuousBatchingManager`` / ``generate_batch`` (5.23): its per-request processors
cover temperature, top-p and top-k only when the shared generation config enables them; greedy-or-sample
(``do_sample``) is global, and presence/frequency penalties and per-request seeds are not supported.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

import torch

from workers.core.errors import ErrorType, RetryableError, WorkerError

from . import memory, prefix
from .batch import DecodeBatch, Row
from .engine_metrics import EngineMetrics
from .failures import Overloaded, as_worker_error
from .generation import Generation, GenerationRequest
from .models import LoadedModel, ModelName, ModelStore, ModelUnavailable
from .slot_batch import SlotBatch
from .slots import SlotCache, unsupported_reason

log = logging.getLogger(__name__)

WAIT_SLICE_SECONDS = 0.5
"""How often a waiting caller runs its ``check``: the most a gone client's row keeps decoding."""
SLOT_RETRY_SECONDS = 30.0
"""After the slot cache could not be set up: the first retry (then doubling, up to ``SLOT_RETRY_CAP_SECONDS``)."""
SLOT_RETRY_CAP_SECONDS = 600.0
class Engine:
    def __init__(self, store: ModelStore, max_batch: int = 16, max_prefill_tokens: int = 16384,
                 static_cache: bool = True, cuda_graphs: bool = True, lean_decode: bool = True,
                 compile_decode: bool = False, max_waiting: int = 8, prefix_cache_tokens: int = 0,
                 decode_ahead: bool = False, prefill_chunk: int = 0):
        self.store = store
        self.prefix_cache_tokens = prefix_cache_tokens   # per model on the slot cache (prefix.py); 0: off
        self.decode_ahead = decode_ahead   # launch step k+1 before reading step k's tokens (slot_batch.py)
        self.prefill_chunk = prefill_chunk   # while rows decode, longer prompts prefill this many tokens a step
        self.max_batch = max_batch
        self.max_waiting = max_waiting     # shed beyond this many waiting requests (``submit(shed=True)``)
        self.max_prefill_tokens = max_prefill_tokens
        self.static_cache = static_cache
        self.cuda_graphs = cuda_graphs     # only used on CUDA, with the static cache
        self.lean_decode = lean_decode     # the lean decode step (decode.py) where the model allows it
        self.compile_decode = compile_decode   # torch.compile that step (slow start: a compile per bucket)
        self._waiting: deque[GenerationRequest] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._batches: dict[ModelName, DecodeBatch | SlotBatch] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._slot_retry: dict[ModelName, memory.Retry] = {}   # models decoding on a fallback, and when to retry
        self._counters = {"steps": 0, "tokens": 0, "completed": 0, "failed": 0, "shed": 0, "largest_batch": 0,
                          "first_tokens": 0, "ttft_seconds_total": 0.0}
        self._active = 0
        self._admitting = 0     # taken out of the waiting line, being prefilled (neither waiting nor active)
        self.metrics = EngineMetrics(self)   # Prometheus: read from stats() at scrape, plus time to first token

    # ---------------------------------------------------------------- callers' side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chat-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: GenerationRequest, shed: bool = False) -> Future:
        """Queue ``request`` for the next admission; with ``shed``, ``Overloaded`` when the line is full."""
        with self._wake:
            if not self.running:
                raise ModelUnavailable("the chat engine is not running")
            if shed and self._line() >= self.max_waiting:
                self._counters["shed"] += 1
                raise Overloaded(len(self._waiting))
            self._waiting.append(request)
            self._wake.notify_all()
        return request.future

    def _line(self) -> int:
        """Requests that will wait for a row: the waiting ones beyond the rows free now (a burst that arrives
        during a long prefill is not shed while rows are free)."""
        return len(self._waiting) - max(0, self.max_batch - self._active - self._admitting)

    def run(self, request: GenerationRequest, timeout: float | None, check: Callable[[], None] | None = None,
            shed: bool = False) -> Generation:
        """Submit and wait (see ``submit`` and ``wait``)."""
        self.submit(request, shed)
        return self.wait(request, timeout, check)

    def wait(self, request: GenerationRequest, timeout: float | None = None,
             check: Callable[[], None] | None = None) -> Generation:
        """The request's generation, waited for in slices of ``WAIT_SLICE_SECONDS``; ``check()`` runs after each
        and raises to give up. On any way out but the result (the deadline: ``RetryableError(TIMEOUT_ERROR)``,
        ``check``'s exception) the request is cancelled: the loop drops its row before its next step."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - time.monotonic())
                if left <= 0:
                    raise RetryableError(f"generation did not finish within {timeout:.2g} s", ErrorType.TIMEOUT_ERROR)
                try:
                    return request.future.result(left)
                except TimeoutError:
                    if check is not None:
                        check()
        except CancelledError:
            raise ModelUnavailable("the request was cancelled (model unloaded or worker stopping)") from None
        except BaseException:
            request.cancel()
            raise

    def unload(self, name: ModelName) -> bool:
        """Unload a model from inside the loop, failing its running requests; returns whether it was loaded."""
        return self._call(lambda: self._unload(name))

    def prepare(self, name: ModelName) -> dict[str, Any]:
        """Set up ``name``'s decode batch now (slot cache, CUDA-graph capture) instead of at its first request."""
        return self._call(lambda: self._prepare(name))

    def stats(self) -> dict[str, Any]:
        decode = {name.value: _describe(batch) for name, batch in list(self._batches.items())}
        return {"running": self.running, "max_batch": self.max_batch, "waiting": len(self._waiting),
                "active": self._active, **self._counters, "decode": decode}

    def _call(self, fn: Callable[[], Any]) -> Any:
        if not self.running:
            return fn()
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify_all()
        return future.result()

    # ---------------------------------------------------------------- the loop thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while self._next_round():
                try:
                    self._run_commands()
                    self._admit()
                    for name in list(self._batches):   # names: no reference to a batch outlives its step
                        self._step(name)
                except Exception:  # a bug must not kill the loop: fail what is running, carry on
                    log.exception("chat engine round failed")
                    self._drop_all(WorkerError("generation failed", ErrorType.INTERNAL_ERROR))
        self._shutdown()

    def _next_round(self) -> bool:
        with self._wake:
            while not (self._stopping or self._waiting or self._commands or self._active):
                self._wake.wait()
            return not self._stopping

    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:  # reported to the caller, never kills the loop
                future.set_exception(exc)

    def _admit(self) -> None:
        if not self._waiting:
            return
        groups: dict[ModelName, list[GenerationRequest]] = {}
        with self._wake:
            waiting, self._waiting = self._waiting, deque()
            for request in waiting:
                if request.cancelled.is_set():
                    request.future.cancel()
                    continue
                group = groups.setdefault(request.model, [])
                room = self.max_batch - len(self._batches.get(request.model, ())) - len(group)
                longest = max([len(request.prompt_ids)] + [len(r.prompt_ids) for r in group])
                if room <= 0 or (group and longest * (len(group) + 1) > self.max_prefill_tokens):
                    self._waiting.append(request)   # next round
                else:
                    group.append(request)
            self._admitting = sum(len(group) for group in groups.values())
        for name, group in groups.items():
            if group:
                self._prefill(name, group)
                self._admitting -= len(group)

    def _prefill(self, name: ModelName, requests: list[GenerationRequest]) -> None:
        loaded = self.store.get(name)
        if loaded is None:
            self._fail(requests, ModelUnavailable(f"{name.value} is not loaded"))
            return
        try:
            batch = self._batch(loaded)
        except Exception:  # no batch for this group (a CUDA error measuring memory, an OOM building it)
            log.exception("setting up the decode batch of %s failed", name.value)
            self._fail(requests, RetryableError(f"{name.value} cannot decode right now (its batch could not be set "
                                                "up); retry shortly", ErrorType.WORKER_UNAVAILABLE, delay=1.0))
            return
        try:
            batch.admit(requests)
        except Exception as exc:  # a failed prefill fails its requests only; the running batch is untouched
            self._fail(requests, as_worker_error(exc))
            return
        self._active += len(requests)   # the rows, and any long prompt still prefilling in chunks (pending)
        self._settle(batch)

    def _prepare(self, name: ModelName) -> dict[str, Any]:
        loaded = self.store.get(name)
        if loaded is None:
            return {"path": "not loaded"}
        with torch.inference_mode():
            return _describe(self._batch(loaded))

    def _batch(self, loaded: LoadedModel) -> DecodeBatch | SlotBatch:
        """The running batch of ``loaded``'s model, made (and warmed up) if there is none yet, or made anew when
        it is an idle fallback whose slot-cache retry is due."""
        batch = self._batches.get(loaded.name)
        retry = self._slot_retry.get(loaded.name)
        if batch is not None and batch.loaded is loaded and not (retry and retry.due and not batch.rows):
            return batch
        self._batches.pop(loaded.name, None)
        del batch
        batch = self._batches[loaded.name] = self._new_batch(loaded)
        return batch

    def _new_batch(self, loaded: LoadedModel) -> DecodeBatch | SlotBatch:
        reason = unsupported_reason(loaded.model) if self.static_cache else "off"
        retry = reason is None   # only a fast path that could work is tried again later
        if reason is None and loaded.device.type == "cuda":
            need = (SlotCache.bytes_needed(loaded.model.config, self.max_batch, loaded.max_context, loaded.dtype)
                    + prefix.bytes_needed(loaded.model.config, self.prefix_cache_tokens, loaded.dtype))
            memory.release(loaded.device)   # a dropped batch held only by a reference cycle goes now
            free = memory.free_bytes(loaded.device)
            if need > 0.8 * free:
                reason = f"its {need / 1e9:.1f} GB KV cache does not fit the {free / 1e9:.1f} GB free"
        if reason is None:
            try:
                batch = SlotBatch(loaded, self.max_batch, cuda_graphs=self.cuda_graphs, lean_decode=self.lean_decode,
                                  compile_decode=self.compile_decode, prefix_tokens=self.prefix_cache_tokens,
                                  decode_ahead=self.decode_ahead, prefill_chunk=self.prefill_chunk)
                batch.warm_up()
                log.info("%s decodes on the slot cache (%s, %s step)", loaded.name.value, batch.path, batch.forward)
                self._slot_retry.pop(loaded.name, None)
                return batch
            except Exception as exc:  # noqa: BLE001 - the fast path must never take the worker down
                reason = f"{type(exc).__name__} while setting it up"
                log.warning("slot cache for %s failed", loaded.name.value, exc_info=True)
            memory.release(loaded.device)   # the half-built slot cache
        if retry:
            schedule = self._slot_retry.setdefault(loaded.name,
                                                   memory.Retry(SLOT_RETRY_SECONDS, SLOT_RETRY_CAP_SECONDS))
            schedule.failed()
            reason += f"; the slot cache is tried again once idle, {schedule.next_at - time.monotonic():.0f} s from now"
        if reason != "off":
            log.warning("%s decodes on the DynamicCache path: %s", loaded.name.value, reason)
        return DecodeBatch(loaded)

    def _step(self, name: ModelName) -> None:
        batch = self._batches[name]
        if isinstance(batch, SlotBatch) and batch.pending:
            self._advance(batch)
        if not batch.rows:
            return
        try:
            batch.step()
        except Exception as exc:  # the batch's state is unknown now: fail its requests, start afresh
            error = as_worker_error(exc)
        else:
            self._counters["steps"] += 1
            self._counters["largest_batch"] = max(self._counters["largest_batch"], len(batch.rows))
            self._settle(batch)
            return
        self._fail(batch.requests, error)
        self._active -= len(batch)
        device = batch.loaded.device
        del self._batches[name], batch   # the last references: its KV cache and graphs are free memory now
        memory.release(device)

    def _advance(self, batch: SlotBatch) -> None:
        """The next chunk of a long prompt that arrived while rows decode (chunked prefill, prefill.py)."""
        for request, error in batch.advance():
            self._active -= 1
            if error is None:
                request.future.cancel()
            else:
                self._fail([request], as_worker_error(error))

    def _settle(self, batch: DecodeBatch | SlotBatch) -> None:
        """Hand new tokens to streams; complete finished rows, fail errored ones, drop cancelled ones (and any
        whose future is already resolved: a request is answered once)."""
        done: list[Row] = []
        for row in batch.rows:
            request = row.request
            new = row.tokens[row.notified:]
            if new and not row.notified:   # the round that chose this request's first token
                self._counters["first_tokens"] += 1
                self._counters["ttft_seconds_total"] += time.monotonic() - request.submitted
                self.metrics.first_token(batch.loaded.name.value, time.monotonic() - request.submitted)
            row.notified = len(row.tokens)
            self._counters["tokens"] += len(new)
            if new and request.on_tokens is not None and not request.cancelled.is_set():
                try:
                    request.on_tokens(new)
                except Exception:  # a broken stream consumer cancels its own request only
                    log.exception("stream callback failed; cancelling its request")
                    request.cancel()
            if row.finish is not None or request.cancelled.is_set() or request.future.done():
                done.append(row)
        if not done:
            return
        batch.remove(done)
        self._active -= len(done)
        now = time.monotonic()
        for row in done:
            request = row.request
            if request.future.done():
                continue
            if row.finish == "error":
                self._fail([request], RetryableError("generation failed for this request: the model's scores were "
                                                     "not finite (NaN/inf) or could not be sampled"))
                continue
            if row.finish is None:
                request.future.cancel()
                continue
            self._counters["completed"] += 1
            request.future.set_result(Generation(
                batch.loaded.name, list(row.tokens), row.finish, len(request.prompt_ids),
                row.admitted - request.submitted, now - request.submitted))

    def _unload(self, name: ModelName) -> bool:
        batch = self._batches.pop(name, None)
        if batch is not None:
            self._fail(batch.requests, ModelUnavailable(f"{name.value} was unloaded"))
            self._active -= len(batch)
            del batch
        return self.store.unload(name)

    def _fail(self, requests: list[GenerationRequest], error: Exception) -> None:
        self._counters["failed"] += len(requests)
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    def _drop_all(self, error: Exception) -> None:
        devices = {batch.loaded.device for batch in self._batches.values()}
        for batch in self._batches.values():
            self._fail(batch.requests, error)
        self._batches.clear()
        self._active = self._admitting = 0
        for device in devices:
            memory.release(device)

    def _shutdown(self) -> None:
        error = ModelUnavailable("the chat engine is stopping")
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        self._fail(waiting, error)
        self._drop_all(error)
        self._run_commands()


def _describe(batch: DecodeBatch | SlotBatch) -> dict[str, Any]:
    return batch.describe() if isinstance(batch, SlotBatch) else {"path": "dynamic_cache"}

"""One model's running sequences on the static slot cache (slots.py), decoded by a CUDA graph when it can.

Rows are slots: the i-th running row owns slot i, so the running rows always fill slots ``0 .. n-1``. A new
request is prefilled eagerly (left-padded batch, transformers ``DynamicCache``, exactly like batch.py) and
copied into the next free slots; a finished row frees its slot and the last row moves into the hole. A decode
step runs over the first ``b`` slots, ``b`` the batch bucket (1, 2, 4, 8, 16, ... up to the slot count) at or
above ``n``: the padding slots are free ones, fed token 0 at position 0, their logits ignored. Attention reads
the first ``span`` columns, ``span`` the smallest span bucket (1024, 4096, ... up to the context; from 128 when
decoding eagerly) above every
row's position. Each row's rotary position is its own length, so a row decodes the same tokens alone or in a
batch, as on the DynamicCache path (up to floating-point reduction order).

The step itself is the lean decode step (decode.py: fused q/k/v and gate/up projections, about half the
kernels of transformers' forward; optionally ``torch.compile``d) for the decoders it supports, transformers'
forward over the slot cache (``SlotCache.update``) for the others.

Sampling, penalties and seeds are per row and unchanged (sampling.py): the graph ends at the logits.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from workers.core.errors import InvalidJob

from . import decode, prefill
from .batch import Row
from .generation import GenerationRequest
from .graphs import DecodeGraphs
from .models import LoadedModel
from .prefix import BLOCK, Match, PrefixCache
from .sampling import FAILED, RowParams, count, new_generator, next_tokens
from .slots import SlotCache

log = logging.getLogger(__name__)

FIRST_SPAN = 1024    # span buckets 1024, 4096, 16384, ... (few graphs; a short span saves little on a GPU)
EAGER_FIRST_SPAN = 128   # without graphs shapes are free: 128, 512, 2048, ... (the CPU pays per column)
WARM_SPANS = 1      # span buckets captured for every batch bucket at warm-up; longer ones on first use


def buckets(limit: int, first: int, factor: int) -> list[int]:
    """first, first*factor, ... below ``limit``, then ``limit`` itself."""
    out, size = [], first
    while size < limit:
        out.append(size)
        size *= factor
    return out + [limit]


def bucket(value: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= value)


class SlotBatch:
    def __init__(self, loaded: LoadedModel, slots: int, cuda_graphs: bool = True, lean_decode: bool = True,
                 compile_decode: bool = False, compile_backend: str | Callable[..., Any] = "inductor",
                 prefix_tokens: int = 0, decode_ahead: bool = False, prefill_chunk: int = 0):
        self.loaded = loaded
        self.chunk = prefill_chunk   # tokens of a long prompt prefilled per step while rows decode; 0: all at once
        self.pending: list[prefill.Partial] = []
        self.decode_ahead = decode_ahead
        self._version = 0     # bumped whenever rows join or leave: a step launched ahead is only valid within one
        self._ahead: tuple[tuple[int, int], int, torch.Tensor] | None = None   # (key, version, logits)
        self.ahead_steps = {"used": 0, "wasted": 0}
        self.rows: list[Row] = []
        model, device = loaded.model, loaded.device
        self.slots, self.max_len = slots, loaded.max_context
        self.cache = SlotCache(model.config, slots, self.max_len, loaded.dtype, device)
        self.prefix = PrefixCache(model.config, prefix_tokens, loaded.dtype, device) if prefix_tokens >= BLOCK else None
        vocab = model.get_output_embeddings().weight.shape[0]
        self._tokens = torch.zeros(slots, dtype=torch.long, device=device)      # token fed next; 0 in free slots
        self._positions = torch.zeros(slots, dtype=torch.long, device=device)   # = cached tokens; 0 in free slots
        self._counts = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self._columns = torch.arange(self.max_len, device=device)
        self._host_tokens = torch.zeros(slots, dtype=torch.long, pin_memory=device.type == "cuda")
        self._lengths: list[int] = []        # host copy of _positions for the running rows
        self._params: RowParams | None = None
        self.batch_buckets = buckets(slots, 1, 2)
        self.graphs = DecodeGraphs(device) if cuda_graphs and device.type == "cuda" else None
        first_span = FIRST_SPAN if self.graphs is not None else EAGER_FIRST_SPAN
        self.span_buckets = buckets(self.max_len, min(first_span, self.max_len), 4)
        self.decode_reason = decode.unsupported_reason(model) if lean_decode else "off"
        self.decoder = decode.LeanDecoder(model, self.cache, self.max_len) if self.decode_reason is None else None
        self._compiled: decode.DecodeStep | None = None
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self.compile_failure: str | None = None
        if compile_decode and self.decoder is not None:
            self._compiled = self.decoder.compiled(compile_backend)
        elif compile_decode:
            self.compile_failure = f"no lean decode step to compile: {self.decode_reason}"

    def __len__(self) -> int:
        """Rows decoding plus prompts still being prefilled: the slots spoken for."""
        return len(self.rows) + len(self.pending)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows] + [partial.request for partial in self.pending]

    @property
    def path(self) -> str:
        return "cuda_graphs" if self.graphs is not None and self.graphs.usable else "static_eager"

    @property
    def forward(self) -> str:
        """Which decode step runs: "lean", "lean_compiled", or "transformers (<why not lean>)"."""
        if self.decoder is None:
            return f"transformers ({self.decode_reason})"
        return "lean_compiled" if self._compiled is not None else "lean"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"path": self.path, "forward": self.forward, "slots": self.slots,
                                "max_len": self.max_len, "kv_cache_gb": round(self.cache.nbytes / 1e9, 3),
                                "prefix_cache": self.prefix.describe() if self.prefix else None,
                                "decode_ahead": {"on": self.decode_ahead, **self.ahead_steps},
                                "prefill_chunk": self.chunk, "pending": len(self.pending)}
        if self.compile_seconds or self.compile_failure:
            info["compile_seconds"] = {f"{rows}x{span}": s for (rows, span), s in sorted(self.compile_seconds.items())}
            info["compile_failure"] = self.compile_failure
        if self.graphs is not None:
            info.update(self.graphs.describe())
        return info

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture the decode graphs of every batch bucket at the first span bucket(s), largest first (the
        shared memory pool then fits the smaller ones). Free slots only: the running rows are untouched."""
        if self.graphs is None or self.rows:
            return
        started = time.perf_counter()
        for span in self.span_buckets[:WARM_SPANS]:
            for rows in reversed(self.batch_buckets):
                if self.graphs.capture((rows, span), lambda r=rows, s=span: self._forward(r, s)) is None:
                    return
        log.info("chat decode graphs ready for %s: %d graphs in %.1f s", self.loaded.name.value,
                 len(self.graphs.keys), time.perf_counter() - started)

    @torch.inference_mode()
    def admit(self, requests: Sequence[GenerationRequest]) -> list[Row]:
        """Prefill ``requests`` and let them join (prefill.py), choosing their first tokens. A prompt that starts
        with a stored prefix (prefix.py) gets it copied and prefills only the rest, alone; the others are
        prefilled together as one left-padded batch. While rows decode, a prompt with more than ``chunk`` tokens
        left to prefill waits in ``pending`` and is prefilled a chunk per step (``advance``); it is not among
        the rows returned. Every prompt's blocks are stored for the next turn."""
        first, n = len(self.rows), len(requests)
        if len(self) + n > self.slots:
            raise RuntimeError(f"{len(self) + n} rows do not fit {self.slots} slots")
        if max(len(r.prompt_ids) for r in requests) > self.max_len:
            raise InvalidJob(f"the prompt is longer than the model context ({self.max_len} tokens)")
        matches = [self.prefix.match(r.prompt_ids) if self.prefix else Match() for r in requests]
        now: list[tuple[GenerationRequest, Match]] = []
        later: list[prefill.Partial] = []
        try:
            for request, match in zip(requests, matches):
                if self.chunk and self.rows and len(request.prompt_ids) - match.tokens > self.chunk:
                    cache = prefill.cache_of(*self.prefix.gather(match)) if self.prefix and match.blocks else None
                    later.append(prefill.Partial(request, cache or DynamicCache(), match.tokens))
                else:
                    now.append((request, match))
            now.sort(key=lambda pair: bool(pair[1].blocks))   # misses first: contiguous slots
            misses = [r for r, m in now if not m.blocks]
            scores = [self._prefill(misses, first)] if misses else []
            scores += [self._prefill_suffix(r, m, first + i) for i, (r, m) in enumerate(now) if m.blocks]
        finally:
            for match in matches:
                if self.prefix:
                    self.prefix.release(match)
        rows = self._join([r for r, _ in now], torch.cat(scores), first) if now else []
        self.pending += later   # only once the others are in: a failed admission leaves nothing behind
        return rows

    def _join(self, requests: list[GenerationRequest], logits: torch.Tensor, first: int) -> list[Row]:
        """Prefilled ``requests`` (their KV in slots ``first ..``) become rows: their first tokens chosen."""
        n, device, lengths = len(requests), self.loaded.device, [len(r.prompt_ids) for r in requests]
        rows = [Row(r, max(1, min(r.sampling.max_tokens, self.loaded.max_context - len(r.prompt_ids))),
                    new_generator(r.sampling.seed, device)) for r in requests]
        try:
            self._positions[first:first + n] = torch.tensor(lengths, dtype=torch.long, device=device)
            self._counts[first:first + n] = 0
            params = RowParams.build([r.request.sampling for r in rows], device)
            chosen = next_tokens(logits, self._counts[first:first + n], params, [r.generator for r in rows])
        except Exception:
            self._clear_free_slots()   # the rows never joined; their slots stay free
            raise
        if self.prefix:
            for i, request in enumerate(requests):
                self.prefix.store(self.cache.keys, self.cache.values, first + i, request.prompt_ids)
        self.rows.extend(rows)
        self._lengths.extend(lengths)
        self._params = None
        self._version += 1
        self._accept(chosen, offset=first)
        return rows

    @torch.inference_mode()
    def advance(self) -> list[tuple[GenerationRequest, Exception | None]]:
        """Prefill the next chunk of the first pending prompt; one whose prompt is complete joins the rows.
        Returns the pending requests dropped: cancelled (None) or failed (the error); the others are untouched."""
        dropped: list[tuple[GenerationRequest, Exception | None]] = []
        for partial in [p for p in self.pending if p.request.cancelled.is_set() or p.request.future.done()]:
            self.pending.remove(partial)
            dropped.append((partial.request, None))
        if not self.pending:
            return dropped
        partial = self.pending[0]
        try:
            scores = partial.advance(self.loaded.model, self.chunk)
            if scores is not None:
                self.pending.pop(0)
                self.cache.load(len(self.rows), partial.cache.layers, [partial.done])
                self._join([partial.request], scores, len(self.rows))
        except Exception as exc:  # noqa: BLE001 - a failed chunk fails its own request only
            if partial in self.pending:
                self.pending.remove(partial)
            dropped.append((partial.request, exc))
        return dropped

    def _prefill(self, requests: Sequence[GenerationRequest], first: int) -> torch.Tensor:
        """Prefill ``requests`` as one left-padded batch into slots ``first ..``: [n, vocab] last-token scores."""
        cache, scores = prefill.batch(self.loaded.model, requests)
        self.cache.load(first, cache.layers, [len(r.prompt_ids) for r in requests])
        return scores

    def _prefill_suffix(self, request: GenerationRequest, match: Match, slot: int) -> torch.Tensor:
        """Prefill the rest of the prompt on top of the matched prefix, into ``slot``: [1, vocab]."""
        assert self.prefix is not None
        past = prefill.cache_of(*self.prefix.gather(match))
        scores = prefill.extend(self.loaded.model, past, request.prompt_ids[match.tokens:], match.tokens)
        self.cache.load(slot, past.layers, [len(request.prompt_ids)])
        return scores

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row."""
        n = len(self.rows)
        key = self._next_key()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (key, self._version):
            logits = ahead[2]
            self.ahead_steps["used"] += 1
        else:
            self.ahead_steps["wasted"] += ahead is not None
            logits = self._launch(key)
        logits = logits[:n]
        self._positions[:n] += 1
        self._lengths = [length + 1 for length in self._lengths]
        if self._params is None:
            self._params = RowParams.build([r.request.sampling for r in self.rows], self.loaded.device)
        self._accept(next_tokens(logits, self._counts[:n], self._params, [r.generator for r in self.rows]))

    def _next_key(self) -> tuple[int, int]:
        """The (batch bucket, span bucket) the next step runs at."""
        return bucket(len(self.rows), self.batch_buckets), bucket(max(self._lengths) + 1, self.span_buckets)

    def _launch(self, key: tuple[int, int]) -> torch.Tensor:
        """Start one decode step (on CUDA it runs asynchronously): its [rows bucket, vocab] logits."""
        rows, span = key
        if self.graphs is not None:
            return self.graphs.run(key, lambda: self._forward(rows, span))
        return self._forward(rows, span)

    def _forward(self, rows: int, span: int) -> torch.Tensor:
        """The model on one token per slot ``[0, rows)``: [rows, vocab] logits. Tensor ops on fixed buffers only
        (this is what the CUDA graph records)."""
        if self.decoder is None:
            return self._transformers_forward(rows, span)
        positions = self._positions[:rows]
        mask = (self._columns[None, :span] <= positions[:, None])[:, None, None, :]   # [rows, 1, 1, span]
        if self._compiled is not None:
            return self._compiled_step(rows, span, positions, mask)
        return self.decoder.step(self._tokens[:rows], positions, mask)

    def _compiled_step(self, rows: int, span: int, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The compiled lean step; its first call per (rows, span) compiles (logged, timed). A compile that
        fails leaves the uncompiled lean step in charge for good."""
        assert self._compiled is not None and self.decoder is not None
        if (rows, span) in self.compile_seconds:
            return self._compiled(self._tokens[:rows], positions, mask)
        started = time.perf_counter()
        limit = len(self.batch_buckets) * len(self.span_buckets) + 2   # one compile per bucket pair
        import torch._dynamo  # noqa: PLC0415 - only when compiling (a slow import)

        try:
            with torch._dynamo.config.patch(recompile_limit=max(limit, torch._dynamo.config.recompile_limit)):
                out = self._compiled(self._tokens[:rows], positions, mask)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop decoding
            self.compile_failure = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("compiling the chat decode step failed (decoding uncompiled): %s", self.compile_failure)
            self._compiled = None
            return self.decoder.step(self._tokens[:rows], positions, mask)
        self.compile_seconds[(rows, span)] = round(time.perf_counter() - started, 1)
        log.info("compiled the chat decode step for batch %d, span %d in %.1f s", rows, span,
                 self.compile_seconds[(rows, span)])
        return out

    def _transformers_forward(self, rows: int, span: int) -> torch.Tensor:
        """transformers' forward over the slot cache (``SlotCache.update``): the step for the models the lean
        step does not cover."""
        positions = self._positions[:rows]
        mask = (self._columns[None, :span] <= positions[:, None])[:, None, None, :]   # [rows, 1, 1, span]
        self.cache.begin(rows, span, positions)
        # a 4D mask is used as is by every decoder's mask preparation (a {"full_attention": mask} dict only by
        # the models whose forward takes per-layer-type masks, e.g. Qwen2 but not Llama)
        out = self.loaded.model(input_ids=self._tokens[:rows, None], attention_mask=mask,
                                position_ids=positions[:, None], past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def remove(self, rows: Sequence[Row]) -> None:
        """Free the slots of finished or cancelled rows; the last rows move into the holes."""
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if self.prefix:   # what was decoded is the start of the next turn's prompt
            for i, row in enumerate(self.rows):
                if id(row) in gone and row.finish != "error":
                    sequence = (list(row.request.prompt_ids) + row.tokens)[:self._lengths[i]]
                    self.prefix.store(self.cache.keys, self.cache.values, i, sequence)
        count = len(keep)
        holes = [i for i in range(count) if id(self.rows[i]) in gone]
        movers = [i for i in keep if i >= count]
        if movers:
            self.cache.move(movers, holes, max(self._lengths[i] for i in movers))
            src = torch.tensor(movers, dtype=torch.long, device=self._tokens.device)
            dst = torch.tensor(holes, dtype=torch.long, device=self._tokens.device)
            for buffer in (self._tokens, self._positions, self._counts):
                buffer[dst] = buffer[src]
            for hole, mover in zip(holes, movers):
                self.rows[hole], self._lengths[hole] = self.rows[mover], self._lengths[mover]
        del self.rows[count:], self._lengths[count:]
        self._clear_free_slots()
        self._params = None
        self._version += 1

    def _read_ahead(self, tokens: torch.Tensor) -> list[int]:
        """``tokens`` on the host. With ``decode_ahead`` the next step is launched first, on the tokens just
        chosen (they are on the device already), so the GPU computes it while the host reads these, streams
        them and admits or drops rows; a step launched ahead is dropped (``wasted``) if rows join or leave
        before it is used. Same math either way: the step it replaces would have read the same buffers."""
        if not self.decode_ahead or self.loaded.device.type != "cuda":
            if self.decode_ahead:
                self._launch_ahead()
            return tokens.tolist()
        host = self._host_tokens[:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._launch_ahead()
        copied.synchronize()
        return host.tolist()

    def _launch_ahead(self) -> None:
        self.ahead_steps["wasted"] += self._ahead is not None   # an admission replaces the one launched before it
        key = self._next_key()
        self._ahead = (key, self._version, self._launch(key))

    def _clear_free_slots(self) -> None:
        """Free slots are fed token 0 at position 0 as batch padding: keep them there."""
        self._tokens[len(self.rows):] = 0
        self._positions[len(self.rows):] = 0

    def _accept(self, tokens: torch.Tensor, offset: int = 0) -> None:
        """Record the chosen tokens of rows ``offset:``; a stop token ends a row without being kept, ``FAILED``
        ends it as an error (and is fed as token 0 until the row's slot is freed, before the next step)."""
        end = len(self.rows)
        self._tokens[offset:end] = tokens.clamp(min=0)
        count(self._counts[offset:end], tokens.clamp(min=0),
              [row.request.sampling for row in self.rows[offset:end]])
        chosen = self._read_ahead(tokens)
        stop = self.loaded.stop_ids
        for i, token in zip(range(offset, end), chosen):
            row = self.rows[i]
            if token == FAILED:
                row.finish = "error"
                continue
            if token in stop:
                row.finish = "stop"
                continue
            row.tokens.append(token)
            if len(row.tokens) >= row.limit:
                row.finish = "length"

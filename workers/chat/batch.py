"""One model's running sequences: a left-padded KV cache with one row per sequence.

New sequences are prefilled together (left padding, one forward) and merged into the running batch between
decode steps; finished rows are removed and the all-padding columns on the left trimmed away. Each row has
its own position counter, so padding never shifts a sequence's rotary positions: a row decodes the same
tokens alone or inside a batch (up to floating-point reduction order).

Admission is atomic: the merged cache, mask and buffers are built aside and the first tokens chosen before
anything is assigned, so a failure anywhere in it (an OOM in one layer's concatenation, in the prefill, in
sampling) leaves the running rows exactly as they were. This is the path used under memory pressure.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .generation import GenerationRequest
from .models import LoadedModel
from .sampling import FAILED, RowParams, count, new_generator, next_tokens


@dataclass(eq=False)
class Row:
    request: GenerationRequest
    limit: int                           # new tokens this row may still produce (max_tokens, capped by context)
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    notified: int = 0                    # tokens already handed to the request's stream
    finish: str | None = None            # "stop" | "length" once finished; "error": no token could be chosen
    admitted: float = field(default_factory=time.monotonic)


class DecodeBatch:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=loaded.device)       # [B, T]: 1 = real token
        self._positions = torch.zeros(0, dtype=torch.long, device=loaded.device)      # [B]: next position
        self._pending = torch.zeros(0, dtype=torch.long, device=loaded.device)        # [B]: token to feed next
        self._counts = torch.zeros(0, 0, dtype=torch.float32, device=loaded.device)   # [B, V]: generated counts
        self._params: RowParams | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows]

    @property
    def width(self) -> int:
        """Cache columns (the longest row plus its left padding)."""
        return self._mask.shape[1]

    @torch.inference_mode()
    def admit(self, requests: Sequence[GenerationRequest]) -> list[Row]:
        """Prefill ``requests`` as one left-padded batch, choose each one's first token, join the batch."""
        device = self.loaded.device
        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), longest, dtype=torch.long)
        mask = torch.zeros(len(requests), longest, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, longest - len(r.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=1)
        rows = [Row(r, max(1, min(r.sampling.max_tokens, self.loaded.max_context - len(r.prompt_ids))),
                    new_generator(r.sampling.seed, device)) for r in requests]
        logits = out.logits[:, -1, :]
        counts = torch.zeros(logits.shape, device=device)
        first = next_tokens(logits, counts, RowParams.build([r.request.sampling for r in rows], device),
                            [r.generator for r in rows])
        self._commit(*self._merged(cache, mask, mask.sum(dim=1), counts), self.rows + rows)
        self._accept(first, offset=len(self.rows) - len(rows))
        return rows

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row."""
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        out = self.loaded.model(input_ids=self._pending[:, None], attention_mask=self._mask,
                                position_ids=self._positions[:, None], past_key_values=self._cache, use_cache=True)
        self._positions = self._positions + 1
        if self._params is None:
            self._params = RowParams.build([r.request.sampling for r in self.rows], self._mask.device)
        self._accept(next_tokens(out.logits[:, -1, :], self._counts, self._params, [r.generator for r in self.rows]))

    @torch.inference_mode()
    def remove(self, rows: Sequence[Row]) -> None:
        """Drop finished or cancelled rows and the padding columns no remaining row needs."""
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self._params = None
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._positions, self._pending, self._counts = self._positions[:0], self._pending[:0], self._counts[:0]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0, 0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._positions = self._positions.index_select(0, index)
        self._pending = self._pending.index_select(0, index)
        self._counts = self._counts.index_select(0, index)

    def _merged(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor
                ) -> tuple[DynamicCache, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor]:
        """The running rows followed by the prefilled ones, left-padding whichever side is shorter: new tensors
        only, nothing of the running batch is changed. Returns (cache, [(keys, values)] per layer, mask,
        positions, pending, counts)."""
        pending = torch.zeros_like(positions)
        if self._cache is None:
            return cache, [(layer.keys, layer.values) for layer in cache.layers], mask, positions, pending, counts
        width = max(self.width, mask.shape[1])
        layers = [(torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)]),
                   torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)]))
                  for old, new in zip(self._cache.layers, cache.layers)]
        return (self._cache, layers, torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)]),
                torch.cat([self._positions, positions]), torch.cat([self._pending, pending]),
                torch.cat([self._counts, counts]))

    def _commit(self, cache: DynamicCache, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                positions: torch.Tensor, pending: torch.Tensor, counts: torch.Tensor, rows: list[Row]) -> None:
        """Install a merged state: plain assignments only (nothing here can fail halfway)."""
        for layer, (keys, values) in zip(cache.layers, layers):
            layer.keys, layer.values = keys, values
        self._cache, self._mask, self._positions, self._pending, self._counts = cache, mask, positions, pending, counts
        self.rows = rows
        self._params = None

    def _accept(self, tokens: torch.Tensor, offset: int = 0) -> None:
        """Record the chosen tokens of rows ``offset:``; a stop token ends a row without being kept, ``FAILED``
        ends it as an error (and is fed as token 0 until the row is removed, before the next step)."""
        rows = range(offset, len(self.rows))
        chosen = tokens.tolist()
        if FAILED in chosen:
            tokens = tokens.clamp(min=0)
        self._pending[offset:] = tokens
        count(self._counts[offset:], tokens, [row.request.sampling for row in self.rows[offset:]])
        stop = self.loaded.stop_ids
        for i, token in zip(rows, chosen):
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


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

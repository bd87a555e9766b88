"""One model's running sequences: a left-padded KV cache with one row per sequence.

New sequences are prefilled together (left padding, one forward) and merged into the running batch between
decode steps; finished rows are removed and the all-padding columns on the left trimmed away. Each row has
its own position counter, so padding never shifts a sequence's rotary positions: a row decodes the same
tokens alone or inside a batch (up to floating-point reduction order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from transformers import DynamicCache

from .models import LoadedModel
from .sampling import RowParams, count, new_generator, next_tokens

if TYPE_CHECKING:
    from .engine import GenerationRequest


@dataclass(eq=False)
class Row:
    request: "GenerationRequest"
    limit: int                           # new tokens this row may still produce (max_tokens, capped by context)
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    notified: int = 0                    # tokens already handed to the request's stream
    finish: str | None = None            # "stop" | "length" once finished
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
    def width(self) -> int:
        """Cache columns (the longest row plus its left padding)."""
        return self._mask.shape[1]

    @torch.inference_mode()
    def admit(self, requests: Sequence["GenerationRequest"]) -> list[Row]:
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
        self._merge(cache, mask, mask.sum(dim=1), rows, torch.zeros(logits.shape, device=device))
        first = next_tokens(logits, self._counts[-len(rows):],
                            RowParams.build([r.request.sampling for r in rows], device), [r.generator for r in rows])
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

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, rows: list[Row],
               counts: torch.Tensor) -> None:
        """Append prefilled rows, left-padding whichever side is shorter."""
        if self._cache is None:
            self._cache, self._mask, self._positions, self._counts = cache, mask, positions, counts
            self._pending = torch.zeros(len(rows), dtype=torch.long, device=mask.device)
            self.rows = list(rows)
            return
        width = max(self.width, mask.shape[1])
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self._positions = torch.cat([self._positions, positions])
        self._pending = torch.cat([self._pending, torch.zeros_like(positions)])
        self._counts = torch.cat([self._counts, counts])
        self.rows.extend(rows)
        self._params = None

    def _accept(self, tokens: torch.Tensor, offset: int = 0) -> None:
        """Record the chosen tokens of rows ``offset:``; a stop token ends a row without being kept."""
        rows = range(offset, len(self.rows))
        self._pending[offset:] = tokens
        count(self._counts[offset:], tokens, [row.request.sampling for row in self.rows[offset:]])
        stop = self.loaded.stop_ids
        for i, token in zip(rows, tokens.tolist()):
            row = self.rows[i]
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

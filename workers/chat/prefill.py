"""Prefill: running prompts through the model before they join the decode batch (slot_batch.py).

Three shapes, one forward each time (transformers' model on a ``DynamicCache``, scores of the last token only):
- ``batch``: prompts with nothing cached, together as one left-padded batch;
- ``extend``: one prompt on top of KV it already has (a prefix from the prefix cache, prefix.py, or the chunks
  prefilled so far): only the new tokens go through the model, at their own positions;
- ``Partial``: a long prompt that arrives while other rows decode, prefilled ``chunk`` tokens per engine round
  (chunked prefill), so the running streams get a decode step between two chunks instead of waiting for the
  whole prompt. Its KV stays in its own ``DynamicCache`` until it joins: free slots are the decode step's
  batch padding, and the step writes into them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .generation import GenerationRequest


def batch(model: Any, requests: Sequence[GenerationRequest]) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill ``requests`` as one left-padded batch: (its cache, [n, vocab] last-token scores)."""
    device, n = model.device, len(requests)
    lengths = [len(r.prompt_ids) for r in requests]
    longest = max(lengths)
    ids = torch.zeros(n, longest, dtype=torch.long)
    mask = torch.zeros(n, longest, dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, longest - lengths[i]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, longest - lengths[i]:] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return cache, out.logits[:, -1, :]


def cache_of(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> DynamicCache:
    """A one-row ``DynamicCache`` holding (copies of) per-layer [1, heads, length, dim] keys and values."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def extend(model: Any, cache: DynamicCache, ids: list[int], start: int) -> torch.Tensor:
    """Run ``ids`` (positions ``start ..``) on top of the ``start`` tokens ``cache`` holds, appending their
    KV to it: [1, vocab] scores of the last one."""
    device = model.device
    end = start + len(ids)
    out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device),
                attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
                position_ids=torch.arange(start, end, device=device)[None], past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1, :]


@dataclass(eq=False)
class Partial:
    """A prompt being prefilled a chunk per round: ``done`` of its tokens are in ``cache``."""

    request: GenerationRequest
    cache: DynamicCache
    done: int

    def advance(self, model: Any, chunk: int) -> torch.Tensor | None:
        """Prefill the next ``chunk`` tokens; the last token's scores once the whole prompt is in."""
        prompt = self.request.prompt_ids
        ids = prompt[self.done:self.done + chunk]
        scores = extend(model, self.cache, ids, self.done)
        self.done += len(ids)
        return scores if self.done == len(prompt) else None

"""Per-request sampling parameters and the batched next-token choice.

Every row of a decode batch carries its own parameters: temperature (0 = greedy), nucleus ``top_p``, OpenAI
``presence_penalty`` / ``frequency_penalty`` over the tokens generated so far, and its own random generator
(seeded from ``seed`` when given), so one request's sampling never depends on which others share its batch.

Nor does its failure: a row whose scores are not finite (NaN/inf: ``torch.multinomial`` raises on them, and
``argmax`` silently picks garbage), or whose sampling raises, gets the token ``FAILED``; the batch ends that row
alone (``finish = "error"``) and the engine fails its request only.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 4096
"""Upper bound of ``max_tokens`` accepted from clients."""

FAILED = -1
"""The token of a row that could not be given one (non-finite scores, a sampling error)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class RowParams:
    """The parameters of a batch's rows as device tensors (rebuilt only when the rows change)."""

    temperature: torch.Tensor   # [B] float
    top_p: torch.Tensor         # [B] float
    presence: torch.Tensor      # [B, 1] float
    frequency: torch.Tensor     # [B, 1] float
    any_penalty: bool
    sampled: list[int]          # rows that sample (temperature > 0); the others are greedy

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> RowParams:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(temperature=column([p.temperature for p in params]),
                   top_p=column([p.top_p for p in params]),
                   presence=column([p.presence_penalty for p in params])[:, None],
                   frequency=column([p.frequency_penalty for p in params])[:, None],
                   any_penalty=any(p.penalised for p in params),
                   sampled=[i for i, p in enumerate(params) if not p.greedy])


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def count(counts: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's chosen token to its ``counts`` row, when one of these rows has a penalty (only penalties
    read the counts; a row's counts are zeroed when it takes its slot): one scatter, no index sort."""
    if any(p.penalised for p in params):
        ones = torch.ones((tokens.shape[0], 1), dtype=counts.dtype, device=counts.device)
        counts.scatter_add_(1, tokens[:, None], ones)


def next_tokens(logits: torch.Tensor, counts: torch.Tensor, rows: RowParams,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Choose one token per row. ``logits`` [B, V] (any float dtype), ``counts`` [B, V] how often each token
    was generated so far by that row. Returns a [B] long tensor on the logits' device; ``FAILED`` for a row
    whose logits are not all finite or whose sampling raised."""
    finite = torch.isfinite(logits).all(dim=-1)
    if not rows.any_penalty and not rows.sampled:   # all greedy: the same index as on an fp32 copy (exact cast)
        return torch.where(finite, logits.argmax(dim=-1), FAILED)
    logits = logits.float()
    if rows.any_penalty:  # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
        logits = logits - counts * rows.frequency - (counts > 0).float() * rows.presence
    chosen = logits.argmax(dim=-1)
    if not rows.sampled:
        return torch.where(finite, chosen, FAILED)
    temperature = rows.temperature.clamp(min=1e-4)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs   # probability mass ranked above each token
    sorted_probs = sorted_probs.masked_fill(before > rows.top_p[:, None], 0.0)  # the first token always stays
    failed = [i for i, ok in enumerate(finite.tolist()) if not ok]   # sampling syncs per row anyway
    for i in rows.sampled:
        if i in failed:
            continue
        try:
            chosen[i] = order[i, torch.multinomial(sorted_probs[i], 1, generator=generators[i])[0]]
        except RuntimeError:
            log.exception("sampling failed for one row; failing that request only")
            failed.append(i)
    chosen[failed] = FAILED
    return chosen

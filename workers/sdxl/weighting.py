"""Prompt weighting (CONTRACT §2: ``compel_enabled`` / ``compel_weights``): ``(term:1.2)`` scales the
text-encoder embeddings of ``term`` instead of being fed to CLIP as literal characters.

The method is the widely used "A1111" one, done for both SDXL text encoders: tokenize each segment on its
own (CLIP pre-tokenizes on word and punctuation boundaries, so the token ids equal those of the whole text),
encode the full sequence once, multiply each token's penultimate-layer hidden state by its weight, then
rescale so the mean of the sequence is what it was before weighting. The pooled embedding (from
``text_encoder_2``) is left unweighted, as compel does. With every weight 1.0 the result equals the
pipeline's own ``encode_prompt``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from workers.core.errors import InvalidJob

MIN_WEIGHT = 0.0
MAX_WEIGHT = 3.0
_WEIGHTED = re.compile(r"\(([^()]*?):\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")


@dataclass(frozen=True)
class Segment:
    text: str
    weight: float = 1.0


def parse(text: str, field: str) -> tuple[Segment, ...]:
    """Split ``text`` into segments; ``(words:1.3)`` gives a weighted one. Unmatched parentheses stay text.
    A weight outside [0, 3] is ``InvalidJob`` naming ``field``."""
    segments: list[Segment] = []
    position = 0
    for match in _WEIGHTED.finditer(text):
        if match.start() > position:
            segments.append(Segment(text[position:match.start()]))
        weight = float(match.group(2))
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise InvalidJob(f"{field} has the weight {match.group(2)} for {match.group(1)[:30]!r}; "
                             f"weights must be in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]")
        segments.append(Segment(match.group(1), weight))
        position = match.end()
    if position < len(text):
        segments.append(Segment(text[position:]))
    return tuple(s for s in segments if s.text.strip())


def is_weighted(segments: tuple[Segment, ...]) -> bool:
    return any(s.weight != 1.0 for s in segments)


def join(first: tuple[Segment, ...], second: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """``first`` then ``second`` with the ``, `` separator the app's appending implies."""
    if first and second:
        return first + (Segment(", "),) + second
    return first or second


def plain_text(segments: tuple[Segment, ...]) -> str:
    """The segments as one unweighted string (the text CLIP sees when weights are off)."""
    return "".join(s.text if s.weight == 1.0 else f"({s.text}:{s.weight:g})" for s in segments)


def encode(pipe: Any, segments: tuple[Segment, ...]) -> tuple[Any, Any]:
    """``(prompt_embeds, pooled_prompt_embeds)`` for ``segments``, as ``encode_prompt`` would shape them
    (batch 1: ``[1, 77, 768+1280]`` and ``[1, 1280]`` for the real model)."""
    import torch

    hidden_states = []
    pooled = None
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    with torch.no_grad():
        for tokenizer, encoder in pairs:
            if tokenizer is None or encoder is None:
                continue
            ids, weights = _tokens(tokenizer, segments)
            device = next(encoder.parameters()).device
            out = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = out[0]
            hidden = out.hidden_states[-2]
            hidden_states.append(_weigh(hidden, torch.tensor(weights, device=device, dtype=hidden.dtype)))
    if pooled is None:
        raise InvalidJob("prompt weighting needs SDXL's second text encoder")
    return torch.cat(hidden_states, dim=-1), pooled


def _tokens(tokenizer: Any, segments: tuple[Segment, ...]) -> tuple[list[int], list[float]]:
    """Token ids ``[bos, ..., eos, pad...]`` of the model's max length, with a weight per token."""
    length = tokenizer.model_max_length
    ids: list[int] = []
    weights: list[float] = []
    for segment in segments:
        piece = tokenizer(segment.text, add_special_tokens=False, truncation=False).input_ids
        ids += piece
        weights += [segment.weight] * len(piece)
    ids, weights = ids[:length - 2], weights[:length - 2]
    pad = length - 2 - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [pad_id] * pad,
            [1.0] + weights + [1.0] + [1.0] * pad)


def _weigh(hidden: Any, weights: Any) -> Any:
    if bool((weights == 1.0).all()):
        return hidden
    before = hidden.float().mean()
    weighted = hidden * weights[None, :, None]
    after = weighted.float().mean()
    if after.abs() > 1e-6:
        weighted = weighted * (before / after).to(hidden.dtype)
    return weighted

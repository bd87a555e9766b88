"""The chat benchmarks' reference and token checks: transformers' eager ``generate`` on the same model, how
far two token lists agree, and where our tokens sit against the reference model's argmax (the tie-aware check
that stays meaningful when bf16 near-ties flip a greedy token)."""
from __future__ import annotations

from typing import Any

import torch


def generate(model: Any, batch: list[list[int]], new: int, **options: Any) -> list[list[int]]:
    """Greedy ``model.generate``, exactly ``new`` tokens; ``options`` go to it (e.g. a static cache)."""
    ids = torch.tensor(batch, device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0, **options)
    return out[:, ids.shape[1]:].tolist()


def equal_prefix(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def top2_gap(model: Any, prompt: list[int], tokens: list[int], index: int) -> float:
    """Baseline logit margin between the best two tokens where ours diverged (a near-tie flips in bf16)."""
    ids = torch.tensor([prompt + tokens[:index]], device=model.device)
    with torch.no_grad():
        top = model(ids, logits_to_keep=1).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def argmax_gaps(model: Any, prompts_: list[list[int]], tokens: list[list[int]]) -> list[dict[str, float]]:
    """Tie-aware check of greedy output: teacher-force the plain model on prompt + our tokens (one forward per
    stream) and measure, at every generated position, how far below the reference's best logit our token's
    logit is. Zero everywhere = our tokens are the reference argmax; small positive gaps at a few positions
    are bf16 near-ties (random weights give flat logits), judged against 1e-2 of the logit scale."""
    out = []
    for prompt, ours_tokens in zip(prompts_, tokens):
        ids = torch.tensor([prompt + ours_tokens], device=model.device)
        with torch.no_grad():
            logits = model(ids, logits_to_keep=len(ours_tokens) + 1).logits[0, :-1].float()
        chosen = logits.gather(1, torch.tensor(ours_tokens, device=logits.device)[:, None])[:, 0]
        gaps = logits.max(dim=1).values - chosen
        scale = logits.abs().max(dim=1).values
        out.append({"max_gap": float(gaps.max()), "max_relative_gap": float((gaps / scale).max()),
                    "positions_not_argmax": int((gaps > 0).sum()), "logit_scale": float(scale.median())})
    return out

"""What the chat benchmarks feed and record: random prompt ids, and each stream's token arrival times."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workers.chat.engine import Engine
from workers.chat.generation import GenerationRequest
from workers.chat.models import ModelName
from workers.chat.sampling import SamplingParams


@dataclass
class Stream:
    submitted: float = field(default_factory=time.perf_counter)
    marks: list[tuple[float, int]] = field(default_factory=list)   # (time, tokens so far)

    def __call__(self, tokens: list[int]) -> None:
        done = self.marks[-1][1] if self.marks else 0
        self.marks.append((time.perf_counter(), done + len(tokens)))

    @property
    def ttft(self) -> float:
        return self.marks[0][0] - self.submitted

    @property
    def decode_rate(self) -> float | None:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(n)]


def ours(engine: Engine, batch: list[list[int]], new: int) -> tuple[float, list[Stream], list[list[int]]]:
    """Submit ``batch`` together; (wall seconds, streams, token ids)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=new)
    streams = [Stream() for _ in batch]
    requests = [GenerationRequest(ModelName.INSTRUCT, ids, greedy, on_tokens=s) for ids, s in zip(batch, streams)]
    started = time.perf_counter()
    for request, stream in zip(requests, streams):
        stream.submitted = time.perf_counter()
        engine.submit(request)
    results = [engine.wait(r, 600) for r in requests]
    return time.perf_counter() - started, streams, [r.token_ids for r in results]

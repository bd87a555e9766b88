"""The prefix cache: KV of recent sequences kept in fixed-size blocks, so a prompt that starts with a sequence
seen before (the app resends the whole conversation every turn) prefills only its new suffix.

A pool of ``blocks`` blocks of ``BLOCK`` tokens per layer ([blocks, kv_heads, BLOCK, head_dim], the slot
cache's layout cut into column blocks) is allocated once, so its memory is fixed and counted with the slot
cache's. Blocks form a tree: a block is identified by its tokens and its parent block, so a block stands for
the whole prefix up to its end, and two conversations that share a system prompt share its blocks.

- ``store(cache, slot, tokens)`` copies the full blocks of a slot's sequence that are not in the tree yet.
- ``match(prompt)`` finds the longest run of stored blocks the prompt starts with (always leaving at least one
  prompt token to prefill: the model's scores for the next token come from it), pins it, and ``load`` copies
  it out (``gather``) as the start of the prompt's prefill cache; ``release`` unpins.
- Reference counts: a block is pinned while a match uses it, and is kept while it has children. Only unpinned
  leaves are evicted, least recently used first, when a store needs room; so a stored prefix is always whole.

Lookups compare tokens, never just hashes, so a collision cannot hand a prompt someone else's KV.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from .slots import kv_bytes, kv_geometry

BLOCK = 16
"""Tokens per block: the granularity of reuse (at most ``BLOCK - 1`` tokens of a match are prefilled again)."""


def bytes_needed(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """The pool's bytes for ``tokens`` (whole blocks only)."""
    return kv_bytes(config, tokens // BLOCK * BLOCK, dtype)


@dataclass(eq=False)
class Block:
    index: int                    # row of the pool
    parent: Block | None
    tokens: tuple[int, ...]
    children: int = 0
    pins: int = 0
    used: int = 0                 # LRU clock


@dataclass
class Match:
    blocks: list[Block] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK


class PrefixCache:
    def __init__(self, config: Any, tokens: int, dtype: torch.dtype, device: torch.device):
        layers, heads, head_dim = kv_geometry(config)
        self.capacity = tokens // BLOCK
        shape = (self.capacity, heads, BLOCK, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._free = list(range(self.capacity - 1, -1, -1))
        self._children: dict[tuple[int, tuple[int, ...]], Block] = {}   # (id of parent or 0, tokens) -> block
        self._leaves: set[Block] = set()
        self._clock = itertools.count(1)
        self.counters = {"lookups": 0, "hits": 0, "tokens_reused": 0, "blocks_stored": 0, "evictions": 0}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def describe(self) -> dict[str, Any]:
        return {"block_tokens": BLOCK, "capacity_tokens": self.capacity * BLOCK,
                "used_tokens": (self.capacity - len(self._free)) * BLOCK, "gb": round(self.nbytes / 1e9, 3),
                **self.counters}

    # ------------------------------------------------------------------ the tree
    def _walk(self, tokens: list[int], limit: int) -> list[Block]:
        """The stored blocks ``tokens`` starts with, up to ``limit`` blocks."""
        chain: list[Block] = []
        parent: Block | None = None
        for start in range(0, limit * BLOCK, BLOCK):
            block = self._children.get((id(parent) if parent else 0, tuple(tokens[start:start + BLOCK])))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def match(self, prompt: list[int]) -> Match:
        """The longest stored prefix of ``prompt`` that leaves at least one token to prefill, pinned."""
        self.counters["lookups"] += 1
        chain = self._walk(prompt, (len(prompt) - 1) // BLOCK) if self.capacity else []
        now = next(self._clock)
        for block in chain:
            block.pins += 1
            block.used = now
        if chain:
            self.counters["hits"] += 1
            self.counters["tokens_reused"] += len(chain) * BLOCK
        return Match(chain)

    def release(self, match: Match) -> None:
        for block in match.blocks:
            block.pins -= 1
        match.blocks = []

    def _allocate(self, protected: set[Block]) -> int | None:
        if self._free:
            return self._free.pop()
        candidates = [b for b in self._leaves if not b.pins and b not in protected]
        if not candidates:
            return None
        victim = min(candidates, key=lambda b: b.used)
        self._leaves.discard(victim)
        del self._children[(id(victim.parent) if victim.parent else 0, victim.tokens)]
        if victim.parent is not None:
            victim.parent.children -= 1
            if not victim.parent.children:
                self._leaves.add(victim.parent)
        self.counters["evictions"] += 1
        return victim.index

    # ------------------------------------------------------------------ copies (eager, between decode steps)
    def store(self, slot_keys: list[torch.Tensor], slot_values: list[torch.Tensor], slot: int,
              tokens: list[int]) -> int:
        """Keep the full blocks of ``tokens`` (whose KV is in columns ``0..len(tokens)-1`` of ``slot``) that are
        not stored yet; returns how many blocks were added (fewer when the pool is full of pinned blocks)."""
        if not self.capacity:
            return 0
        whole = len(tokens) // BLOCK
        chain = self._walk(tokens, whole)
        now = next(self._clock)
        for block in chain:
            block.used = now
        protected = set(chain)
        fresh: list[int] = []
        for _ in range(whole - len(chain)):
            index = self._allocate(protected)
            if index is None:
                break
            fresh.append(index)
        if not fresh:
            return 0
        first, count = len(chain) * BLOCK, len(fresh)
        target = torch.tensor(fresh, dtype=torch.long, device=self.keys[0].device)
        for pool, source in zip(self.keys + self.values, slot_keys + slot_values):
            columns = source[slot, :, first:first + count * BLOCK]             # [heads, count*BLOCK, dim]
            pool[target] = columns.unflatten(1, (count, BLOCK)).transpose(0, 1)
        parent = chain[-1] if chain else None
        for i, index in enumerate(fresh):
            start = first + i * BLOCK
            block = Block(index, parent, tuple(tokens[start:start + BLOCK]), used=now)
            self._children[(id(parent) if parent else 0, block.tokens)] = block
            if parent is not None:
                parent.children += 1
                self._leaves.discard(parent)
            parent = block
        self._leaves.add(parent)
        self.counters["blocks_stored"] += count
        return count

    def gather(self, match: Match) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The matched blocks' keys and values, per layer [1, heads, match.tokens, dim] (new tensors)."""
        source = torch.tensor([b.index for b in match.blocks], dtype=torch.long, device=self.keys[0].device)
        keys, values = ([pool[source].transpose(0, 1).flatten(1, 2)[None] for pool in pools]
                        for pools in (self.keys, self.values))
        return keys, values

"""The static KV cache: one preallocated [slots, kv_heads, max_len, head_dim] key and value tensor per layer.

A running sequence owns one slot (row) and writes its tokens at columns 0, 1, 2, ... of it, so a slot's write
index is also the sequence's next rotary position. The decode step feeds one token per slot; ``update`` (what
transformers' attention layers call) scatters each row's new key/value at that row's own position and hands
the attention the first ``span`` columns of the first ``rows`` slots. Which columns a row may attend to comes
from the step's boolean mask (``column <= position``), so nothing beyond a row's length is ever read as real.

Shapes, addresses and the Python-side state (``rows``, ``span``) stay fixed for a given (rows, span) pair,
which is what lets the decode step be replayed as a CUDA graph (graphs.py).
"""
from __future__ import annotations

from typing import Any

import torch


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config: what one token's cached keys and values are."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def kv_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of ``tokens`` cached tokens in every layer."""
    layers, heads, head_dim = kv_geometry(config)
    return 2 * layers * tokens * heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class SlotCache:
    def __init__(self, config: Any, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        layers, heads, head_dim = kv_geometry(config)
        shape = (slots, heads, max_len, head_dim)
        self.slots, self.max_len = slots, max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._rows, self._span = 0, 0
        self._index: torch.Tensor | None = None

    @staticmethod
    def bytes_needed(config: Any, slots: int, max_len: int, dtype: torch.dtype) -> int:
        return kv_bytes(config, slots * max_len, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------ the decode step (graph-safe: tensor ops only)
    def begin(self, rows: int, span: int, positions: torch.Tensor) -> None:
        """Set up one decode step over slots ``[0, rows)``: row r writes at column ``positions[r]``."""
        heads, head_dim = self.keys[0].shape[1], self.keys[0].shape[3]
        self._rows, self._span = rows, span
        self._index = positions.view(rows, 1, 1, 1).expand(rows, heads, 1, head_dim).contiguous()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache protocol: store this step's [rows, heads, 1, dim] key/value, return the cache."""
        keys, values = self.keys[layer_idx][:self._rows], self.values[layer_idx][:self._rows]
        keys.scatter_(2, self._index, key_states.to(keys.dtype))
        values.scatter_(2, self._index, value_states.to(values.dtype))
        return keys[:, :, :self._span], values[:, :, :self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span

    # ------------------------------------------------------------ slot bookkeeping (between steps, eager)
    def load(self, first: int, layers: Any, lengths: list[int]) -> None:
        """Copy a left-padded prefill cache (transformers ``DynamicCache`` layers, [n, heads, longest, dim])
        into slots ``first .. first+n-1``, each sequence starting at column 0."""
        n = len(lengths)
        longest = max(lengths)
        index = None
        if min(lengths) != longest:  # shift every row left by its padding (columns past its length: don't care)
            device = self.keys[0].device
            pad = torch.tensor([longest - length for length in lengths], device=device)
            columns = (torch.arange(longest, device=device)[None, :] + pad[:, None]).clamp(max=longest - 1)
            shape = (n, self.keys[0].shape[1], longest, self.keys[0].shape[3])
            index = columns[:, None, :, None].expand(shape)
        for layer, keys, values in zip(layers, self.keys, self.values):
            for states, target in ((layer.keys, keys), (layer.values, values)):
                if index is not None:
                    states = states.gather(2, index)
                target[first:first + n, :, :longest].copy_(states)

    def move(self, sources: list[int], targets: list[int], length: int) -> None:
        """Copy the first ``length`` columns of slots ``sources`` into slots ``targets`` (pairwise)."""
        if not sources or length <= 0:
            return
        device = self.keys[0].device
        src = torch.tensor(sources, dtype=torch.long, device=device)
        dst = torch.tensor(targets, dtype=torch.long, device=device)
        for tensor in self.keys + self.values:
            tensor[dst, :, :length] = tensor[src, :, :length]


def unsupported_reason(model: Any) -> str | None:
    """Why the slot cache cannot drive ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return "the model has no decoder config"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r} is not sdpa"
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return "the model has sliding-window layers"
    return None

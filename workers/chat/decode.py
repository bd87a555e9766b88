"""The lean decode step: one token per slot through a Qwen2/Llama-style decoder over the slot cache, the same
math as transformers' forward in about a quarter of its kernels.

Inside the CUDA graph of a decode step (graphs.py) the GPU time per kernel (~2-3 us) is what remains: the
transformers forward launches ~46 small kernels per layer (an fp32 RMSNorm as 8 elementwise kernels, rotary
as 10, three q/k/v projections each with a bias add, two gate/up projections, ...). Per layer here: 13
non-view ops (CPU dispatch-mode count, tests/chat/test_chat_decode_fusion.py); 16 CUDA kernels on an
H100 with torch 2.11 bf16 (the 3 beyond the ops: cuDNN SDPA's memset, the down_proj split-K GEMM's memset and
reduce; the q/k/v bias rides in the GEMM's epilogue):

    RMSNorm        F.rms_norm with the weight: one fused kernel on CUDA (fp32 inside, one cast at the end)
    [q; k; v]      ONE matmul with the concatenated bias (weights fused without extra memory: fused.py)
    rotary         q and k together, 2 kernels: x viewed as halves [.., 1, 2, dim/2] times a per-position 2x2
                   table [[cos, -sin], [sin, cos]] (broadcast mul), summed over the input half. Bitwise the
                   rotate_half formula: each product rounded alone, then one add of two terms
    cache write    k and v stored at each row's own position (index_put: one kernel each, in place)
    attention      SDPA over the first ``span`` columns with the step's mask (made additive once per step, not
                   in every layer's SDPA call); GQA by grouping the query heads per key/value head ([rows,
                   kv_heads, groups, dim]: the call transformers makes for one query token), so keys and values
                   are never repeated
    o_proj + residual   ONE in-place GEMM with beta = 1 (``hidden.addmm_(a, W.t())``; W.t() is a transposed
                   view, which cuBLAS takes as is); with an o_proj bias: linear, then add
    RMSNorm, ONE [gate; up] matmul, SiLU, * up, down_proj + residual (in-place GEMM as for o_proj)

then the final norm and lm_head. Rounding: the fused RMSNorm applies the weight in fp32 before the one cast
(transformers casts, then multiplies in the low dtype), and the residual GEMMs add the residual inside the
GEMM's fp32 accumulation (transformers rounds the projection, then adds). Same math, another bf16 rounding
order: in fp32 the logits agree with transformers' to ~1e-6 relative, in bf16 their error against an fp32
reference is no larger than transformers' own (tested); greedy tokens can differ where the top two logits
are within bf16 rounding.

Only what was checked is taken: Qwen2 and Llama decoders (q/k/v bias or none, SiLU MLP, RMSNorm, rotary with
a static table); anything else decodes with transformers' forward (``unsupported_reason`` says why).
``compiled()`` gives a ``torch.compile`` of the step (fullgraph, static shapes) whose Triton kernels the
decode graphs capture like any others.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .fused import fuse, fuse_linears
from .slots import SlotCache

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")   # inv_freq fixed at init: a position table holds
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Layer(NamedTuple):
    input_norm: torch.Tensor
    input_eps: float
    qkv: torch.Tensor                 # [(heads + 2 * kv_heads) * dim, hidden], a view of the model's weights
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    post_eps: float
    gate_up: torch.Tensor             # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    keys: torch.Tensor                # the slot cache's [slots, kv_heads, max_len, dim] tensors of this layer
    values: torch.Tensor


def unsupported_reason(model: Any) -> str | None:
    """Why the lean step cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} has no lean decode step (only {', '.join(SUPPORTED_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the decoder does not have the Qwen2/Llama module layout"
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return "the model has no linear lm_head"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rotary type {rope!r} changes with the sequence length"
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or ["full_attention"])):
        return "the model has sliding-window layers"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
            return "a layer is not a plain Qwen2/Llama layer (q/k norms or another attention)"
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, torch.nn.Linear) for p in projections):
            return "a projection is not a plain Linear (quantised or replaced?)"
        if len({p.bias is None for p in projections[:3]}) > 1 or len({p.bias is None for p in projections[4:6]}) > 1:
            return "q/k/v (or gate/up) projections differ in having a bias"
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
            return "a layer norm is not the RMSNorm the lean step reproduces"
        heads, kv_heads = projections[0].out_features // attn.head_dim, projections[1].out_features // attn.head_dim
        if (heads != config.num_attention_heads or heads != kv_heads * attn.num_key_value_groups
                or projections[2].out_features != kv_heads * attn.head_dim or attn.head_dim % 2):
            return "the attention head layout is not the one the lean step assumes"
    return None


class LeanDecoder:
    """The decode step of one model over one slot cache. Building it fuses the model's q/k/v and gate/up
    weights in place (fused.py): the model's memory and its transformers forward are unchanged."""

    def __init__(self, model: Any, cache: SlotCache, max_len: int):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        inner, config = model.model, model.config
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = self.heads // first.num_key_value_groups
        self.groups = first.num_key_value_groups
        self.scale = float(first.scaling)
        self.embed = inner.embed_tokens.weight
        self.final_norm, self.final_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.lm_head, self.lm_head_bias = model.lm_head.weight, model.lm_head.bias
        self.layers = [self._layer(layer, keys, values)
                       for layer, keys, values in zip(inner.layers, cache.keys, cache.values)]
        if self.embed.device.type == "cuda":
            torch.cuda.empty_cache()   # the last layer's old parts
        self.rope = self._rope_table(inner.rotary_emb, max_len, self.embed.dtype, self.embed.device)
        self.rows = torch.arange(cache.slots, device=self.embed.device)
        self.open = torch.zeros((), dtype=self.embed.dtype, device=self.embed.device)      # additive mask values
        self.closed = torch.full((), -torch.inf, dtype=self.embed.dtype, device=self.embed.device)

    @staticmethod
    def _layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = (mlp.gate_proj, mlp.up_proj)
        if mlp.gate_proj.weight.device.type == "cuda":
            torch.cuda.empty_cache()   # the previous layer's old parts: one layer at a time is ever doubled
        with torch.no_grad():
            return Layer(
                input_norm=layer.input_layernorm.weight, input_eps=float(layer.input_layernorm.variance_epsilon),
                qkv=fuse_linears(qkv),
                qkv_bias=fuse([p.bias for p in qkv]) if qkv[0].bias is not None else None,
                o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
                post_norm=layer.post_attention_layernorm.weight,
                post_eps=float(layer.post_attention_layernorm.variance_epsilon),
                gate_up=fuse_linears(gate_up),
                gate_up_bias=fuse([p.bias for p in gate_up]) if gate_up[0].bias is not None else None,
                down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias, keys=keys, values=values)

    @staticmethod
    def _rope_table(rotary: Any, max_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[max_len, 2, 2, dim/2]: per position the 2x2 rotation of the head's two halves, [out half][in half]
        = [[cos_low, -sin_low], [sin_high, cos_high]], from the model's rotary module (what its forward
        computes for those positions). sum_in(x_halves[in] * table[out][in]) == x * cos + rotate_half(x) * sin
        term for term (the negated sin is exact, addition of two terms commutes)."""
        with torch.no_grad():
            positions = torch.arange(max_len, device=device)[None, :]
            cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), positions)
            cos, sin = cos[0], sin[0]
            half = sin.shape[-1] // 2
            low = torch.stack((cos[:, :half], -sin[:, :half]), dim=1)       # out = low half
            high = torch.stack((sin[:, half:], cos[:, half:]), dim=1)       # out = high half
            return torch.stack((low, high), dim=1).contiguous()

    def compiled(self, backend: str | Callable[..., Any] = "inductor") -> DecodeStep:
        """``step`` under ``torch.compile`` (one graph, static shapes: a compile per batch/span bucket)."""
        return torch.compile(self.step, fullgraph=True, dynamic=False, backend=backend)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for one token per slot ``[0, rows)``: ``tokens`` [rows] (long) at ``positions``
        [rows] (their cache columns), ``mask`` [rows, 1, 1, span] (bool: the columns each row attends to).
        Writes each row's key/value at its position. Tensor ops on fixed buffers only (graph-capturable)."""
        rows, span = tokens.shape[0], mask.shape[-1]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        rotated, qk_width = heads + kv_heads, (heads + kv_heads) * dim
        row_index = self.rows[:rows]
        bias = torch.where(mask, self.open, self.closed)        # SDPA's own bool -> additive mask, once per step
        rotation = self.rope[positions][:, None]               # [rows, 1 (heads), 2 (out), 2 (in), dim/2]
        hidden = F.embedding(tokens, self.embed)               # [rows, hidden], a fresh tensor (updated in place)
        for layer in self.layers:
            x = rms_norm(hidden, layer.input_norm, layer.input_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            qk = rotate(qkv[:, :qk_width].view(rows, rotated, dim), rotation)
            layer.keys[row_index, :, positions] = qk[:, heads:]
            layer.values[row_index, :, positions] = qkv[:, qk_width:].view(rows, kv_heads, dim)
            query = qk[:, :heads].view(rows, kv_heads, self.groups, dim)
            attn = F.scaled_dot_product_attention(query, layer.keys[:rows, :, :span], layer.values[:rows, :, :span],
                                                  attn_mask=bias, scale=self.scale)
            hidden = residual(hidden, attn.reshape(rows, heads * dim), layer.o, layer.o_bias)
            x = rms_norm(hidden, layer.post_norm, layer.post_eps)
            gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            hidden = residual(hidden, F.silu(gate) * up, layer.down, layer.down_bias)
        return F.linear(rms_norm(hidden, self.final_norm, self.final_eps), self.lm_head, self.lm_head_bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2/Llama RMSNorm as one op (one fused kernel on CUDA instead of transformers' eight):
    ``F.rms_norm`` computes a bf16/fp16 input in fp32 and applies the weight there, before its one cast back
    (transformers casts first, then multiplies by the weight in x's dtype: one rounding apart)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotary of ``x`` [rows, heads, dim] (rotate_half layout: the two halves of the head dimension) with
    ``rotation`` [rows, 1, 2, 2, dim/2] (rows of ``LeanDecoder.rope``): a broadcast mul and a sum over the
    input half, 2 kernels for q and k together. Each product is rounded on its own and the sum adds two
    terms, so the result is bitwise ``x * cos + rotate_half(x) * sin`` in any dtype."""
    rows, heads, dim = x.shape
    return (x.view(rows, heads, 1, 2, dim // 2) * rotation).sum(3).view(rows, heads, dim)


def residual(hidden: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden + F.linear(x, weight, bias)``; without a bias as ONE GEMM writing into ``hidden`` (beta = 1: the
    residual is added inside the GEMM's accumulation, rounded once; an out-of-place ``addmm`` would first copy
    ``hidden`` into a new output). ``hidden`` must be the step's own tensor, not a view of an input."""
    if bias is not None:
        return hidden + F.linear(x, weight, bias)
    return hidden.addmm_(x, weight.t())

"""The lean decode step's fused ops (decode.py), on the CPU: how many non-view aten ops one layer dispatches
(a TorchDispatchMode count: the kernels a CUDA graph replays, up to the GEMMs' bias copies), the rotary as a
2x2 table bitwise equal to transformers' rotate_half, the residual folded into the GEMM, and the bf16 logits
no further from an fp32 reference than transformers' own bf16 forward."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from workers.chat import decode
from workers.chat.models import LoadedModel, ModelName, load_model
from workers.chat.slots import SlotCache

# one layer of the lean step, as dispatched (views not counted): 2 norms, [q; k; v] and [gate; up] GEMMs, the
# rotary (mul, sum), the k/v cache writes, SDPA, the o_proj and down_proj GEMMs with the residual in them,
# SiLU and its product. It was 19 before the fused ops (2 * mul after the norms, flip + 2 mul + add in the
# rotary, 2 residual adds): bench/NOTES.md, session 3.
LAYER_OPS = Counter({"rms_norm": 2, "linear": 2, "mul": 2, "sum": 1, "index_put_": 2,
                     "scaled_dot_product_attention": 1, "addmm_": 2, "silu": 1})


class OpCount(TorchDispatchMode):
    """The aten ops dispatched inside the mode that are not views (in-place ops count: they run a kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        returns = func._schema.returns
        if not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def qwen(demo_models) -> LoadedModel:
    """A demo Qwen of this module's own (fusing re-points its weights)."""
    return load_model(ModelName.INSTRUCT, demo_models["qwen_instruct"], torch.device("cpu"), 1024)


def step_inputs(vocab: int, positions: list[int], span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(positions))
    tokens = torch.randint(0, vocab, (len(positions),), generator=generator)
    where = torch.tensor(positions)
    mask = (torch.arange(span)[None, :] <= where[:, None])[:, None, None, :]
    return tokens, where, mask


def filled_cache(model: Any, slots: int, max_len: int, dtype: torch.dtype) -> SlotCache:
    """A slot cache holding random keys/values (what earlier steps would have left there), the same bf16
    values whatever ``dtype``."""
    cache = SlotCache(model.config, slots, max_len, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(11)
    for tensor in cache.keys + cache.values:
        tensor.copy_((torch.randn(tensor.shape, generator=generator) * 2).to(torch.bfloat16))
    return cache


def counted(decoder: decode.LeanDecoder, inputs: tuple[torch.Tensor, ...]) -> Counter[str]:
    with torch.inference_mode(), OpCount() as mode:
        decoder.step(*inputs)
    return mode.ops


def test_ops_per_layer(qwen):
    """Per layer = (ops of the whole step - ops of the step with no layers) / layers: the count of the model's
    real layer stack, whatever it has, not a fixed total."""
    model = qwen.model
    layers = model.config.num_hidden_layers
    decoder = decode.LeanDecoder(model, filled_cache(model, 4, 64, qwen.dtype), 64)
    inputs = step_inputs(model.config.vocab_size, [5, 17, 30], span=32)
    bare = copy.copy(decoder)
    bare.layers = []
    whole, outside = counted(decoder, inputs), counted(bare, inputs)
    per_layer = Counter({op: (n - outside[op]) // layers for op, n in whole.items() if n != outside[op]})
    assert all((n - outside[op]) % layers == 0 for op, n in whole.items())
    assert per_layer == LAYER_OPS, per_layer
    assert sum(per_layer.values()) == 13
    # outside the layers: bool mask -> additive, rotary rows, embedding; final norm and lm_head
    assert outside == Counter({"where": 1, "index": 1, "embedding": 1, "rms_norm": 1, "linear": 1}), outside


def test_step_leaves_its_inputs_alone(qwen):
    """The residual GEMMs write into the step's own hidden tensor, never into the embedding or the inputs:
    two steps over the same inputs give the same logits."""
    model = qwen.model
    decoder = decode.LeanDecoder(model, filled_cache(model, 4, 64, qwen.dtype), 64)
    inputs = step_inputs(model.config.vocab_size, [3, 9], span=16)
    before = [t.clone() for t in inputs] + [decoder.embed.clone()]
    with torch.inference_mode():
        first, second = decoder.step(*inputs), decoder.step(*inputs)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(before, [*inputs, decoder.embed]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_table_equals_rotate_half(qwen, dtype):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    rotary = qwen.model.model.rotary_emb
    table = decode.LeanDecoder._rope_table(rotary, 512, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim = 3, 4, 2, qwen.model.model.layers[0].self_attn.head_dim
    qk = (torch.randn(rows, heads + kv_heads, dim, generator=generator) * 3).to(dtype)
    positions = torch.tensor([0, 77, 511])
    with torch.no_grad():
        cos, sin = rotary(qk, positions[:, None])                           # [rows, 1, dim]
    q, k = apply_rotary_pos_emb(qk[:, :heads, None], qk[:, heads:, None], cos, sin, unsqueeze_dim=1)
    ours = decode.rotate(qk, table[positions][:, None])
    assert torch.equal(ours, torch.cat((q, k), dim=1)[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_gemm(dtype):
    torch.manual_seed(1)
    hidden, x = torch.randn(3, 64).to(dtype), torch.randn(3, 48).to(dtype)
    weight, bias = torch.randn(64, 48).to(dtype), torch.randn(64).to(dtype)
    reference = hidden.double() + x.double() @ weight.double().t()
    plain = hidden + F.linear(x, weight)
    out = decode.residual(hidden.clone(), x, weight, None)
    error, plain_error = (out.double() - reference).abs().max(), (plain.double() - reference).abs().max()
    if dtype == torch.float32:
        assert error <= 1e-5 * reference.abs().max()
    else:
        assert error <= plain_error                                          # rounded once, not twice
    target = hidden.clone()
    assert decode.residual(target, x, weight, None) is target               # in place: no output copy
    with_bias = decode.residual(hidden, x, weight, bias)                     # a bias: linear + add, as before
    assert with_bias is not hidden and torch.equal(with_bias, hidden + F.linear(x, weight, bias))


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a.double() - reference.double()).abs().max() / reference.double().abs().max())


def transformers_step(model: Any, cache: SlotCache, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """transformers' forward for one token per slot over the slot cache (as slot_batch.py calls it)."""
    tokens, positions, mask = inputs
    cache.begin(tokens.shape[0], mask.shape[-1], positions)
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def test_bf16_logits_as_close_to_fp32_as_transformers(demo_models):
    """The fused ops change bf16 rounding, not the math: over the same weights (bf16 values) and the same
    cache, the lean bf16 step's logits are no further (x2, rounding luck) from transformers' fp32 forward
    than transformers' bf16 forward is; in fp32 the two agree to 1e-5."""
    path = demo_models["qwen_instruct"]
    half = load_model(ModelName.INSTRUCT, path, torch.device("cpu"), 1024).model.to(torch.bfloat16)
    full = load_model(ModelName.INSTRUCT, path, torch.device("cpu"), 1024).model.to(torch.bfloat16).float()
    inputs = step_inputs(half.config.vocab_size, [5, 17, 40, 2], span=48)
    caches = {name: filled_cache(half, 4, 64, dtype) for name, dtype in
              (("lean", torch.bfloat16), ("bf16", torch.bfloat16), ("fp32", torch.float32), ("lean32", torch.float32))}
    assert torch.equal(caches["lean"].keys[1].float(), caches["fp32"].keys[1])
    with torch.inference_mode():
        reference = transformers_step(full, caches["fp32"], inputs)
        theirs = transformers_step(half, caches["bf16"], inputs)
        ours = decode.LeanDecoder(half, caches["lean"], 64).step(*inputs)
        ours32 = decode.LeanDecoder(full, caches["lean32"], 64).step(*inputs)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    their_error, our_error = relative_error(theirs, reference), relative_error(ours, reference)
    assert 0 < their_error < 0.05 and our_error <= 2 * their_error, (our_error, their_error)
    assert relative_error(ours32, reference) <= 1e-5
    # the keys each step wrote at the rows' positions: the same rotary, from differently rounded projections
    rows = torch.arange(4)
    written = caches["lean"].keys[0][rows, :, inputs[1]].double()
    expected = caches["fp32"].keys[0][rows, :, inputs[1]].double()
    assert (written - expected).abs().max() <= 0.05 * expected.abs().max()


def cuda_kernels(fn: Any) -> Counter[str]:
    """The CUDA kernels (and memsets/copies) one call of ``fn`` launches, by name."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_kernels_per_layer_and_bf16_error(rows):
    """On CUDA, two layers at Qwen2.5-7B width in bf16 (random weights): the kernels one layer launches, the
    logits against transformers' fp32 forward, and a CUDA graph replay of the step equal to the eager step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32000, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, attn_implementation="sdpa")
    full = Qwen2ForCausalLM(config).to("cuda").eval().requires_grad_(False)
    half = copy.deepcopy(full).to(torch.bfloat16)
    full.to(torch.bfloat16).float()                                          # the same (bf16) weight values
    tokens, positions, mask = (t.cuda() for t in step_inputs(config.vocab_size, [5, 17, 300, 2][:rows], 320))
    caches = {}
    for name, dtype in (("lean", torch.bfloat16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        caches[name] = filled_cache(half, 4, 512, dtype)
        caches[name].keys = [t.cuda() for t in caches[name].keys]
        caches[name].values = [t.cuda() for t in caches[name].values]
    decoder = decode.LeanDecoder(half, caches["lean"], 512)
    inputs = (tokens, positions, mask)
    with torch.inference_mode():
        reference = transformers_step(full, caches["fp32"], inputs)
        theirs = transformers_step(half, caches["bf16"], inputs)
        ours = decoder.step(*inputs)
        bare = copy.copy(decoder)
        bare.layers = []
        whole, outside = cuda_kernels(lambda: decoder.step(*inputs)), cuda_kernels(lambda: bare.step(*inputs))
        per_layer = {name: (n - outside[name]) / 2 for name, n in whole.items() if n != outside[name]}
        print(f"\nrows {rows}: {sum(per_layer.values())} kernels per layer, {sum(outside.values())} outside")
        for name, n in sorted(per_layer.items(), key=lambda item: item[0]):
            print(f"  {n:4.1f}  {name[:150]}")
        their_error, our_error = relative_error(theirs, reference), relative_error(ours, reference)
        print(f"  relative error vs fp32: ours {our_error:.3g}, transformers bf16 {their_error:.3g}")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decoder.step(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            captured = decoder.step(*inputs)
        graph.replay()
        eager = decoder.step(*inputs)
    assert torch.equal(captured, eager)
    assert our_error <= 2 * their_error
    # H100, torch 2.11: 16 (the 13 ops, the [q; k; v] bias in the GEMM's epilogue, + cuDNN SDPA's memset and
    # the down_proj split-K GEMM's memset and reduce), 22 before the fused ops
    assert sum(per_layer.values()) <= 16

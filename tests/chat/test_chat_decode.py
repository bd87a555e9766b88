"""The lean decode step (decode.py) against transformers' forward over the same slot cache (slot_batch.py), on
the CPU in fp32: the demo Qwen2 (q/k/v bias, GQA), tiny Llamas built here (no bias; biases everywhere with
llama3 rotary scaling), a Qwen3 that must fall back; the fused weights share the model's storage; the
compiled step (traced whole, no inductor on the CPU) and the CHAT_COMPILE_DECODE setting."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from workers.chat import decode
from workers.chat.engine import Engine
from workers.chat.fused import storage_bytes
from workers.chat.generation import GenerationRequest
from workers.chat.handler import ChatHandler
from workers.chat.models import LoadedModel, ModelName, SingleModel, load_model
from workers.chat.sampling import SamplingParams
from workers.chat.settings import ChatSettings
from workers.chat.slot_batch import SlotBatch, bucket

from .conftest import drive

RELATIVE = 1e-5


@pytest.fixture(scope="module")
def qwen(demo_models) -> LoadedModel:
    """A demo Qwen of this module's own (fusing re-points its weights)."""
    return load_model(ModelName.INSTRUCT, demo_models["qwen_instruct"], torch.device("cpu"), 1024)


def tiny(kind: str, **extra: Any) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(7)
    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, **extra)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape))
    model.eval().requires_grad_(False)
    return LoadedModel(ModelName.INSTRUCT, model, None, torch.device("cpu"), frozenset(), 1024)


def prompts(vocab: int, lengths: tuple[int, ...], max_tokens: int = 24, seed: int = 0) -> list[GenerationRequest]:
    generator = torch.Generator().manual_seed(seed)
    return [GenerationRequest(ModelName.INSTRUCT, torch.randint(0, vocab, (n,), generator=generator).tolist(),
                              SamplingParams(temperature=0.0, max_tokens=max_tokens)) for n in lengths]


def both_steps(batch: SlotBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(lean, transformers) logits of the next step over the running rows' batch bucket (padding slots
    included). Each writes the same rows' key/value at the same positions, then attends."""
    rows = bucket(len(batch.rows), batch.batch_buckets)
    span = bucket(max(batch._lengths) + 1, batch.span_buckets)
    assert batch.decoder is not None
    with torch.inference_mode():
        lean = batch._forward(rows, span)
        reference = batch._transformers_forward(rows, span)
    return lean, reference


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_logits_equal_transformers_forward(qwen):
    batch = SlotBatch(qwen, slots=8, cuda_graphs=False)
    assert batch.forward == "lean" and batch.describe()["forward"] == "lean"
    vocab = qwen.model.config.vocab_size
    with torch.inference_mode():
        batch.admit(prompts(vocab, (9,)))
    lean, reference = both_steps(batch)                       # batch 1
    assert lean.shape == reference.shape == (1, vocab) and relative(lean, reference) <= RELATIVE
    with torch.inference_mode():
        batch.admit(prompts(vocab, (40, 3), seed=1))           # 3 rows of different lengths -> bucket 4
        batch.step()
    lean, reference = both_steps(batch)
    assert lean.shape == (4, vocab) and relative(lean, reference) <= RELATIVE


def plan(vocab: int) -> dict[int, list[GenerationRequest]]:
    return {0: prompts(vocab, (12, 30, 5), max_tokens=22), 4: prompts(vocab, (17,), max_tokens=20, seed=3)}


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_greedy_tokens_equal_transformers_step(qwen, kind):
    loaded = qwen if kind == "qwen" else tiny("llama")
    vocab = loaded.model.config.vocab_size
    lean = SlotBatch(loaded, slots=4, cuda_graphs=False)
    assert lean.forward == "lean"
    reference = SlotBatch(loaded, slots=4, cuda_graphs=False, lean_decode=False)
    assert reference.forward == "transformers (off)"
    got, expected = drive(lean, plan(vocab)), drive(reference, plan(vocab))
    assert got == expected and min(len(t) for t in got) >= 20


@pytest.mark.parametrize("options", [{}, {"attention_bias": True, "mlp_bias": True, "rope_parameters": {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16}}])
def test_llama_logits(options):
    loaded = tiny("llama", **options)
    assert decode.unsupported_reason(loaded.model) is None
    batch = SlotBatch(loaded, slots=4, cuda_graphs=False)
    layer = batch.decoder.layers[0]
    assert (layer.qkv_bias is None) == (not options) and (layer.gate_up_bias is None) == (not options)
    with torch.inference_mode():
        batch.admit(prompts(96, (7, 50, 21)))
        for _ in range(3):
            batch.step()
    lean, reference = both_steps(batch)
    assert relative(lean, reference) <= RELATIVE


def test_fused_weights_share_the_model_storage(demo_models):
    loaded = load_model(ModelName.INSTRUCT, demo_models["qwen_instruct"], torch.device("cpu"), 256)
    model = loaded.model
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        before_logits = model(ids).logits
    params = list(model.parameters())
    before = storage_bytes(params)
    assert before == sum(p.numel() * p.element_size() for p in params)   # one storage per parameter

    first = SlotBatch(loaded, slots=2, cuda_graphs=False).decoder
    assert first is not None
    assert [p for p in model.parameters()] == params                    # the same Parameter objects
    assert storage_bytes(list(model.parameters())) == before            # no memory growth
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    layer = first.layers[0]
    size = attn.q_proj.weight.element_size()
    assert attn.q_proj.weight.data_ptr() == layer.qkv.data_ptr()
    assert attn.k_proj.weight.data_ptr() == layer.qkv.data_ptr() + attn.q_proj.weight.numel() * size
    assert attn.v_proj.bias.data_ptr() == layer.qkv_bias.data_ptr() + (attn.q_proj.bias.numel()
                                                                        + attn.k_proj.bias.numel()) * size
    assert mlp.up_proj.weight.data_ptr() == layer.gate_up.data_ptr() + mlp.gate_proj.weight.numel() * size
    assert torch.equal(layer.qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights = [t for part in first.layers for t in part[:12] if isinstance(t, torch.Tensor)]
    assert {t.untyped_storage().data_ptr() for t in weights} <= owned   # the decoder holds views only

    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before_logits)          # transformers' forward: same values
    second = SlotBatch(loaded, slots=2, cuda_graphs=False).decoder    # fusing again: the same views, no copy
    assert second is not None and second.layers[1].gate_up.data_ptr() == first.layers[1].gate_up.data_ptr()
    assert storage_bytes(list(model.parameters())) == before


def test_grouped_query_attention_equals_repeated_keys():
    """The step's GQA (query heads grouped per key/value head) equals transformers' repeat_kv attention and
    SDPA's own enable_gqa, with a boolean mask of different lengths per row."""
    torch.manual_seed(0)
    rows, heads, kv_heads, span, dim = 3, 8, 2, 40, 16
    query = torch.randn(rows, heads, 1, dim)
    keys, values = torch.randn(rows, kv_heads, span, dim), torch.randn(rows, kv_heads, span, dim)
    mask = (torch.arange(span)[None, :] <= torch.tensor([4, 39, 17])[:, None])[:, None, None, :]
    groups = heads // kv_heads
    grouped = F.scaled_dot_product_attention(query.view(rows, kv_heads, groups, dim), keys, values, attn_mask=mask)
    repeated = F.scaled_dot_product_attention(query, keys.repeat_interleave(groups, 1),
                                              values.repeat_interleave(groups, 1), attn_mask=mask)
    native = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(grouped.reshape(rows, heads, 1, dim), repeated, atol=1e-6)
    assert torch.allclose(native, repeated, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_transformers(dtype):
    """The fused ``F.rms_norm`` (weight applied in fp32 before the one cast) against transformers' RMSNorm
    (cast, then * weight in x's dtype) and an fp32 reference of the same math: equal up to rounding in fp32;
    in bf16/fp16 exactly the fp32 reference rounded once, so never further from it than transformers."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    norm = Qwen2RMSNorm(256, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256))
    x = (torch.randn(64, 256) * 4).to(dtype)
    with torch.inference_mode():
        ours, theirs = decode.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
        wide, eps = x.double(), norm.variance_epsilon
        reference = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    assert ours.dtype == theirs.dtype == dtype
    if dtype == torch.float32:
        assert relative(ours, theirs) <= 1e-6 and relative(ours, reference) <= 1e-6
        return
    ours_error, their_error = (ours.double() - reference).abs(), (theirs.double() - reference).abs()
    half_ulp = torch.finfo(dtype).eps / 2                                   # computed in fp32, rounded once
    assert (ours_error <= reference.abs() * half_ulp * 1.001).all()
    assert ours_error.max() <= their_error.max() and ours_error.mean() < their_error.mean()


def test_unsupported_models_use_transformers_forward(qwen):
    qwen3 = tiny("qwen3")
    reason = decode.unsupported_reason(qwen3.model)
    assert reason is not None and "qwen3" in reason
    config = copy.deepcopy(qwen.model.config)
    config.hidden_act = "gelu"
    gelu = SimpleNamespace(config=config, model=qwen.model.model, lm_head=qwen.model.lm_head)
    assert "silu" in decode.unsupported_reason(gelu)
    with pytest.raises(ValueError):
        decode.LeanDecoder(qwen3.model, SlotBatch(qwen3, slots=1, cuda_graphs=False).cache, 16)
    results = {}
    for lean in (True, False):
        engine = Engine(SingleModel(qwen3), max_batch=2, lean_decode=lean)
        engine.start()
        try:
            info = engine.prepare(ModelName.INSTRUCT)
            assert info["path"] == "static_eager" and info["forward"].startswith("transformers (")
            results[lean] = [engine.run(r, 30).token_ids for r in prompts(96, (6, 11), max_tokens=6)]
        finally:
            engine.stop()
    assert results[True] == results[False] and all(len(t) == 6 for t in results[True])


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_traces_whole_and_matches(qwen, fresh_dynamo):
    """fullgraph (no graph breaks), static shapes, through AOT autograd's functionalisation (the in-place
    cache writes); inductor itself is left to the GPU run. Then the slot batch's compiled path, timed per
    bucket, and its fallback when the compiler fails."""
    vocab = qwen.model.config.vocab_size
    compiled = SlotBatch(qwen, slots=4, cuda_graphs=False, compile_decode=True, compile_backend="aot_eager")
    assert compiled.forward == "lean_compiled"
    reference = SlotBatch(qwen, slots=4, cuda_graphs=False)
    assert drive(compiled, plan(vocab)) == drive(reference, plan(vocab))
    assert compiled.compile_seconds and compiled.compile_failure is None
    assert set(compiled.describe()["compile_seconds"]) == {f"{r}x{s}" for r, s in compiled.compile_seconds}

    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    failing = SlotBatch(qwen, slots=4, cuda_graphs=False, compile_decode=True, compile_backend=broken)
    assert drive(failing, plan(vocab)) == drive(reference, plan(vocab))
    assert failing.forward == "lean" and "no compiler here" in (failing.compile_failure or "")


def test_compile_setting(settings):
    assert ChatSettings.from_env({}).chat_compile_decode is False and settings.chat_compile_decode is False
    assert ChatSettings.from_env({"CHAT_COMPILE_DECODE": "true"}).chat_compile_decode is True
    with pytest.raises(ConfigError, match="CHAT_COMPILE_DECODE"):
        ChatSettings.from_env({"CHAT_COMPILE_DECODE": "sometimes"})
    assert ChatHandler(ChatSettings(device="cpu", chat_compile_decode=True)).engine.compile_decode is True


def test_handler_decodes_with_the_lean_step(handler):
    info = handler.engine.stats()["decode"][ModelName.INSTRUCT.value]
    assert info["forward"] == "lean" and "compile_seconds" not in info


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_lean_step_under_graphs(demo_models, fresh_dynamo):
    """On CUDA (fp32, so no bf16 near-ties): the lean step and its inductor compile, captured as CUDA graphs,
    give transformers' eager step's tokens."""
    cuda = load_model(ModelName.INSTRUCT, demo_models["qwen_instruct"], torch.device("cuda"), 1024)
    cuda.model.float()
    vocab = cuda.model.config.vocab_size
    reference = drive(SlotBatch(cuda, slots=4, cuda_graphs=False, lean_decode=False), plan(vocab))
    for options in ({}, {"compile_decode": True}):
        batch = SlotBatch(cuda, slots=4, cuda_graphs=True, **options)
        batch.warm_up()
        assert drive(batch, plan(vocab)) == reference
        assert batch.path == "cuda_graphs" and batch.graphs is not None and batch.graphs.replays > 0, batch.describe()
        assert batch.forward == ("lean_compiled" if options else "lean"), batch.describe()

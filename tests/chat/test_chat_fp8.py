"""CHAT_FP8: the setting, the refusal where FP8 cannot run (the CPU), which layers it converts (the decoder
layers' projections, never the embedding or lm_head), the lean decode step over fused FP8 weights, and on a GPU
of capability 8.9 or newer the tiny model loaded with FP8 on against the same model in bf16.

torchao's ``quantize_`` refuses without a CUDA device of capability 8.9, but the ``Float8Tensor`` it makes runs
on the CPU (torch's CPU ``_scaled_mm``): ``float8_like_torchao`` builds those tensors with the worker's own
configuration (workers/gpu/fp8.config), as ``quantize_``'s handler does, so the fused decode step is tested
here too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import ConfigError
from workers.chat import create_handler
from workers.chat.decode import LeanDecoder
from workers.chat.engine import Engine
from workers.chat.generation import GenerationRequest
from workers.chat.models import LoadedModel, ModelName, ModelStore, SingleModel, fp8_selection, load_model
from workers.chat.sampling import SamplingParams
from workers.chat.settings import ChatSettings
from workers.chat.slots import SlotCache
from workers.gpu import fp8

from .conftest import chat_settings

FP8_GPU = torch.cuda.is_available() and fp8.unavailable_reason(torch.device("cuda")) is None
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
PROMPT = list(range(5, 40))


def tiny_bf16(path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.bfloat16).eval()
    return model.requires_grad_(False)


def float8_like_torchao(model: torch.nn.Module) -> int:
    """What ``quantize_(model, fp8.config(), filter_fn)`` does to the selected layers, on any device."""
    from torchao.quantization import Float8Tensor
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

    config = fp8.config()
    activation, weight = config.granularity
    modules = dict(model.named_modules())
    names = fp8_selection(model).names
    for name in names:
        inputs = QuantizeTensorToFloat8Kwargs(config.activation_dtype, activation,
                                              hp_value_lb=config.activation_value_lb,
                                              kernel_preference=config.kernel_preference)
        quantised = Float8Tensor.from_hp(modules[name].weight, float8_dtype=config.weight_dtype, granularity=weight,
                                         mm_config=config.mm_config, kernel_preference=config.kernel_preference,
                                         act_quant_kwargs=inputs)
        modules[name].weight = torch.nn.Parameter(quantised, requires_grad=False)
    return len(names)


def greedy(loaded: LoadedModel, prompts: list[list[int]], new: int = 10) -> tuple[list[list[int]], dict]:
    """The greedy tokens of ``prompts`` submitted together, and how the engine decoded them."""
    engine = Engine(SingleModel(loaded), max_batch=len(prompts))
    engine.start()
    try:
        requests = [GenerationRequest(ModelName.INSTRUCT, p, SamplingParams(temperature=0.0, max_tokens=new))
                    for p in prompts]
        for request in requests:
            engine.submit(request)
        tokens = [engine.wait(r, 120).token_ids for r in requests]
        return tokens, engine.stats()["decode"][ModelName.INSTRUCT.value]
    finally:
        engine.stop()


def worst_gap(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> float:
    """How far below the model's own teacher-forced best logit the decoded tokens sit (of the logit scale)."""
    ids = torch.tensor([prompt + tokens], device=model.device)
    with torch.inference_mode():
        logits = model(ids, logits_to_keep=len(tokens) + 1).logits[0, :-1].float()
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return float(((logits.max(dim=1).values - chosen) / logits.abs().max(dim=1).values).max())


def test_chat_fp8_is_off_by_default():
    assert ChatSettings.from_env({}).chat_fp8 is False
    assert ChatSettings.from_env({"CHAT_FP8": "true"}).chat_fp8 is True


def test_the_worker_refuses_fp8_on_the_cpu_at_start(demo_models):
    """The handler's construction fails (the worker exits CONFIG_ERROR there), before any model loads."""
    for build in (lambda s: ModelStore(s), create_handler):
        with pytest.raises(ConfigError) as caught:
            build(chat_settings(demo_models, chat_fp8=True))
        assert str(caught.value) == "CHAT_FP8 is on but FP8 needs CUDA capability ≥ 8.9; the device is cpu"


def test_the_decoder_layers_projections_are_selected_not_the_embedding_or_lm_head(demo_models):
    model = tiny_bf16(demo_models["qwen_instruct"])
    selection = fp8_selection(model)
    assert selection.names == tuple(f"model.layers.{i}.{name}" for i in range(2) for name in PROJECTIONS)
    assert selection.kept == {}
    fp32 = AutoModelForCausalLM.from_pretrained(demo_models["qwen_instruct"], local_files_only=True)
    assert fp8_selection(fp32).names == () and len(fp8_selection(fp32).kept) == 14   # what the CPU loads: fp32


def test_an_all_zero_input_row_gives_the_bias_not_nan(demo_models):
    """A left-padded prompt's padding rows leave attention as zeros; their scale must not be 0 (0/0 = NaN)."""
    model = tiny_bf16(demo_models["qwen_instruct"])
    float8_like_torchao(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    rows = torch.zeros(3, q_proj.in_features, dtype=torch.bfloat16)
    rows[1] = torch.randn(q_proj.in_features, dtype=torch.bfloat16)
    out = F.linear(rows, q_proj.weight, q_proj.bias)
    assert torch.isfinite(out).all() and torch.equal(out[0], q_proj.bias) and torch.equal(out[2], q_proj.bias)


def test_the_lean_step_fuses_fp8_weights_in_place_and_decodes_the_models_own_argmax(demo_models):
    model = tiny_bf16(demo_models["qwen_instruct"])
    assert float8_like_torchao(model) == 14
    tokenizer = AutoTokenizer.from_pretrained(demo_models["qwen_instruct"])
    loaded = LoadedModel(ModelName.INSTRUCT, model, tokenizer, torch.device("cpu"), frozenset(), 4096)
    cache = SlotCache(model.config, 1, 256, torch.bfloat16, torch.device("cpu"))
    decoder = LeanDecoder(model, cache, 256)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv = decoder.layers[0].qkv
    assert fp8.is_float8(qkv) and qkv.shape[0] == sum(p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.k_proj.weight.qdata.data_ptr() == qkv.qdata[attn.q_proj.out_features:].data_ptr()   # views of it
    assert torch.equal(attn.v_proj.weight.scale, qkv.scale[-attn.v_proj.out_features:])
    again = LeanDecoder(model, cache, 256).layers[0]
    assert again.qkv.qdata.data_ptr() == qkv.qdata.data_ptr()   # fusing again: the same storage, no copy
    assert fp8.is_float8(again.gate_up) and mlp.up_proj.weight.shape == (mlp.up_proj.out_features, mlp.hidden_size)
    assert loaded.describe()["fp8_layers"] == 14
    tokens, decode = greedy(loaded, [PROMPT, PROMPT[:20]])   # two prompts: one left-padded in the shared prefill
    assert decode["forward"] == "lean"
    for prompt, decoded in zip((PROMPT, PROMPT[:20]), tokens):
        assert len(decoded) == 10 and worst_gap(model, prompt, decoded) <= 1e-2


# -- on a GPU with FP8 ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA device of capability 8.9 or newer")
def test_fp8_on_a_gpu_loads_converted_decodes_in_graphs_and_stays_near_bf16(demo_models):
    device = torch.device("cuda")
    path = demo_models["qwen_instruct"]
    base = load_model(ModelName.INSTRUCT, path, device, 4096)
    ours = load_model(ModelName.INSTRUCT, path, device, 4096, fp8=True)
    assert ours.describe()["fp8_layers"] == 14 and base.describe()["fp8_layers"] == 0
    assert ours.model.lm_head.weight.dtype == torch.bfloat16 and not fp8.is_float8(ours.model.lm_head.weight)
    tokens, decode = greedy(ours, [PROMPT, PROMPT[:20]])
    assert decode["path"] == "cuda_graphs" and decode["forward"] == "lean" and decode["failure"] is None
    for prompt, decoded in zip((PROMPT, PROMPT[:20]), tokens):
        assert worst_gap(ours.model, prompt, decoded) <= 5e-2
    ids = torch.tensor([PROMPT + tokens[0]], device=device)
    with torch.inference_mode():
        want, got = base.model(ids).logits.float(), ours.model(ids).logits.float()
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) <= 0.1

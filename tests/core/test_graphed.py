"""CUDA graphs of a module's forward (workers/gpu/graphed.py): what runs eagerly and why, on any machine;
replay equal to eager, one graph per signature, fallbacks, on a CUDA device (skipped elsewhere)."""
from __future__ import annotations

import pytest
import torch

from common.settings import Diffusion
from workers.gpu import graphed


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, scale=1.0, extra=None):
        out = self.linear(x) * scale
        if extra is not None:
            out = out + extra["bias"]
        return (out, out.sum())


def test_install_leaves_a_cpu_module_alone():
    module = Affine()
    assert graphed.install(module, "affine") is None
    assert "forward" not in vars(module) and graphed.graphs_of(module) is None


def test_cuda_graphs_setting_defaults_on():
    assert Diffusion.from_env({}).cuda_graphs is True
    assert Diffusion.from_env({"CUDA_GRAPHS": "0"}).cuda_graphs is False


def test_calls_that_cannot_be_replayed_run_eagerly():
    module = Affine()
    graphs = graphed.ForwardGraphs("affine", module.forward, torch.device("cuda", 0))
    x = torch.randn(2, 8)
    with torch.no_grad():
        out, total = graphs(x)                    # a CPU tensor: not on the graphs' device
    assert torch.equal(out, module.linear(x)) and graphs.eager_calls == 1
    graphs(x)                                     # autograd on
    assert graphs.replays == 0 and graphs.eager_calls == 2 and graphs.describe()["graphs"] == 0


def test_signature_covers_shapes_dtypes_and_plain_values():
    graphs = graphed.ForwardGraphs("affine", Affine().forward, torch.device("cpu"))

    def key(*args, **kwargs):
        return graphs._key(*torch.utils._pytree.tree_flatten((args, kwargs)))

    x = torch.zeros(2, 8)
    with torch.no_grad():
        assert key(x, scale=1.0) == key(torch.ones(2, 8), scale=1.0)       # values do not matter
        assert key(x, scale=1.0) != key(x, scale=0.5)                      # plain arguments do
        assert key(x) != key(torch.zeros(3, 8)) != key(x.half())           # shapes and dtypes do
        assert key(x) != key(torch.zeros(8, 2).t())                        # and strides
        assert key(x, extra={"bias": {1, 2}}) is None                      # an unhashable value: eager
        assert key(torch.zeros(2, 8, requires_grad=True)) is None
    assert key(x) is None                                                  # autograd on: eager


def test_static_buffers_take_every_argument_layout():
    dense = torch.arange(6.0).reshape(2, 3).t()                 # transposed: dense, not contiguous
    expanded = torch.tensor(7.0).expand(4)                      # stride 0 (WAN's ``t.expand(batch)``)
    for tensor in (dense, expanded, torch.arange(4.0)):
        buffer = graphed.static_like(tensor)
        assert torch.equal(buffer, tensor) and 0 not in buffer.stride()
        buffer.copy_(tensor + 1)                                # later calls copy into it
        assert torch.equal(buffer, tensor + 1)
    assert graphed.static_like(dense).stride() == dense.stride()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replay_equals_eager_one_graph_per_signature():
    module = Affine().cuda().eval()
    eager = module.forward
    graphs = graphed.install(module, "affine", limit=2)
    assert graphs is not None and graphed.graphs_of(module) is graphs
    with torch.inference_mode():
        for rows, scale in ((2, 1.0), (2, 1.0), (3, 1.0), (2, 0.5), (2, 1.0)):
            x = torch.randn(rows, 8, device="cuda")
            bias = torch.randn(8, device="cuda")
            got = module(x, scale=scale, extra={"bias": bias.expand(rows, 8)})   # an expanded argument too
            want = eager(x, scale=scale, extra={"bias": bias.expand(rows, 8)})
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            got[0].zero_()   # the caller owns what it got: the graph's own output is untouched
    d = graphs.describe()
    assert d["failure"] is None and d["graphs"] == 2 and d["replays"] == 5
    graphs.release()
    assert graphs.describe()["graphs"] == 0
    graphed.uninstall(module)
    assert "forward" not in vars(module)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdxl_unet_graphs_match_eager(demo_models):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(demo_models["sdxl"], subfolder="unet").cuda().half().eval()
    eager = unet.forward
    graphs = graphed.install(unet, "tiny UNet")
    g = torch.Generator("cuda").manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.half, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.half, generator=g)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, device="cuda", dtype=torch.half, generator=g),
             "time_ids": torch.randn(2, 6, device="cuda", dtype=torch.half, generator=g)}
    with torch.inference_mode():
        for t in (999.0, 500.0):
            timestep = torch.tensor(t, device="cuda")
            got = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]
            want = eager(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]
            assert torch.equal(got, want)
    assert graphs.describe()["graphs"] == 1 and graphs.replays == 2

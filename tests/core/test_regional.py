"""Regional compilation (workers/gpu/regional.py): a no-op off CUDA; on a CUDA device (skipped elsewhere) every
block of the named classes compiled in place, the outputs those of the plain blocks within rounding, one
compile serving other batch sizes and lengths, and the compiled blocks captured by the CUDA graphs."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from common.settings import Diffusion
from workers.gpu import graphed, regional

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.linear(self.norm(x))) * 0.5


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(32) for _ in range(4)])
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_nothing_is_compiled_off_cuda():
    model = Stack()
    assert regional.compile_blocks(model, ("Block",)) == 0
    assert regional.compiled_blocks(model) == 0


def test_compile_blocks_setting_defaults_on():
    assert Diffusion.from_env({}).compile_blocks is True
    assert Diffusion.from_env({"COMPILE_BLOCKS": "false"}).compile_blocks is False


@pytest.mark.gpu
@cuda
def test_blocks_compile_once_for_every_shape_and_match_the_plain_blocks():
    torch.manual_seed(0)
    model = Stack().cuda().eval()
    shapes = ((2, 16), (6, 40), (12, 7), (3, 100), (5, 9))
    inputs = [torch.randn(batch, length, 32, device="cuda") for batch, length in shapes]
    with torch.inference_mode():
        plain = [model(x) for x in inputs]
    torch._dynamo.reset()
    counters.clear()
    assert regional.compile_blocks(model, ("Block",)) == 4 and regional.compiled_blocks(model) == 4
    compiled, graphs = [], []
    with torch.inference_mode():
        for x in inputs:
            compiled.append(model(x))
            graphs.append(counters["stats"]["unique_graphs"])
    for ours, reference in zip(compiled, plain):
        assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max(), (ours - reference).abs().max()
    assert 1 <= graphs[0] and graphs[-1] == graphs[1], graphs   # four blocks; no new compile after two shapes
    assert regional.uncompile_blocks(model) == 4 and regional.compiled_blocks(model) == 0


@pytest.mark.gpu
@cuda
def test_compiled_blocks_inside_a_cuda_graph_replay_the_compiled_result():
    torch.manual_seed(1)
    model = Stack().cuda().eval()
    regional.compile_blocks(model, ("Block",))
    x = torch.randn(4, 24, 32, device="cuda")
    with torch.inference_mode():
        expected = model(x)
        graphs = graphed.install(model, "stack")
        first, again = model(x).clone(), model(x * 2).clone()
        doubled = type(model).forward(model, x * 2)
    assert graphs.describe()["graphs"] == 1 and graphs.describe()["replays"] >= 1
    assert torch.allclose(first, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(again, doubled, rtol=1e-5, atol=1e-5)
    graphed.uninstall(model)

"""The one CUDA-graph capture helper (workers/gpu/capture.py) and how its two users fall back when it fails.

On any machine: the argument checks (before any CUDA call), the replay check against the warm-up result, and
that a capture that cannot happen leaves both users on their eager path with the reason reported. On a CUDA
device (skipped elsewhere): a captured function replays what the eager call computes, in a shared pool."""
from __future__ import annotations

import math

import pytest
import torch

from workers.chat.graphs import DecodeGraphs
from workers.gpu import capture, graphed


class Recorded:
    """A stand-in for a captured graph on the CPU: "replaying" runs the recorded function into its outputs."""

    def __init__(self, fn):
        self.fn = fn
        self.outputs = fn()

    def replay(self) -> None:
        self.outputs.copy_(self.fn())


def never_called() -> torch.Tensor:
    raise AssertionError("the function ran although the arguments were refused")


@pytest.mark.parametrize("warm_up", [0, -1, 1.5, True, None])
def test_a_warm_up_that_is_not_a_positive_count_is_refused(warm_up):
    with pytest.raises(ValueError, match="warm_up must be a positive number of calls"):
        capture.capture(never_called, device=torch.device("cuda", 0), pool=None, warm_up=warm_up)


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("meta"), "cuda"])
def test_only_a_cuda_device_can_be_captured_on(device):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        capture.capture(never_called, device=device, pool=None, warm_up=1)


def test_relative_error_covers_every_tensor_of_the_output_tree():
    a, b = torch.ones(4), torch.full((2,), 2.0)
    assert capture.relative_error((a, {"b": b}, 3), (a.clone(), {"b": b.clone()}, 3)) == 0.0
    off = capture.relative_error((a, b), (a, b * 1.5))
    assert off == pytest.approx(float((b * 0.5).norm()) / math.hypot(float(a.norm()), float((b * 1.5).norm())))
    assert capture.relative_error(a.half(), a.double()) == 0.0               # compared in fp32
    assert capture.relative_error((a, b), (a,)) == math.inf                  # leaves that do not pair up
    assert capture.relative_error("text", "text") == math.inf                # nothing to compare
    assert math.isnan(capture.relative_error(torch.tensor([math.nan]), torch.ones(1)))


def test_check_replay_accepts_a_faithful_replay_and_names_what_a_bad_one_differs_from():
    x = torch.arange(4.0)
    graph = Recorded(lambda: x * 2)
    capture.check_replay(capture.Captured(graph, graph.outputs, x * 2))
    assert graph.outputs.tolist() == [0, 2, 4, 6]                            # it did replay

    x.add_(1)   # the function read something the "graph" did not: the replay disagrees with the warm-up
    with pytest.raises(RuntimeError, match=r"differs from the eager step \(relative error"):
        capture.check_replay(capture.Captured(graph, graph.outputs, torch.arange(4.0) * 2),
                             against="the eager step")
    nan = Recorded(lambda: torch.full((2,), math.nan))
    with pytest.raises(RuntimeError, match="relative error nan"):
        capture.check_replay(capture.Captured(nan, nan.outputs, torch.ones(2)))


def test_settle_off_cuda_does_nothing():
    capture.settle(torch.device("cpu"))


def test_decode_graphs_that_cannot_capture_decode_eagerly_and_say_why():
    graphs = DecodeGraphs(torch.device("cpu"))
    x = torch.arange(3.0)
    assert graphs.run((1, 1024), lambda: x + 1).tolist() == [1, 2, 3]
    assert graphs.keys == [] and graphs.replays == 0 and graphs.failure is not None
    assert "(1, 1024)" in graphs.describe()["failed"]


def test_forward_graphs_whose_capture_is_refused_run_eagerly_for_good():
    module = torch.nn.Linear(4, 4)
    graphs = graphed.ForwardGraphs("linear", module.forward, torch.device("cpu"))
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(graphs(x), module(x))
        assert torch.equal(graphs(x), module(x))
    assert graphs.failure == "ValueError: CUDA graphs need a CUDA device, not device(type='cpu')"
    assert graphs.describe()["graphs"] == 0 and graphs.eager_calls == 2 and graphs.replays == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_captured_function_replays_the_eager_result_in_a_shared_pool():
    device = torch.device("cuda", 0)
    weight = torch.randn(16, 16, device=device)
    x = torch.randn(8, 16, device=device)
    calls = []

    def step() -> torch.Tensor:
        calls.append(1)
        return torch.relu(x @ weight) + 1

    first = capture.capture(step, device=device, pool=None, warm_up=2, snapshot=lambda t: t.float())
    assert len(calls) == 3                                    # two warm-up calls, one recorded
    capture.check_replay(first)
    pool = first.graph.pool()
    second = capture.capture(lambda: x.sum(dim=1), device=device, pool=pool, warm_up=1)
    capture.check_replay(second)
    x.copy_(torch.randn(8, 16, device=device))               # new values at the same address
    first.graph.replay()
    second.graph.replay()
    torch.testing.assert_close(first.outputs, torch.relu(x @ weight) + 1)
    torch.testing.assert_close(second.outputs, x.sum(dim=1))
    assert len(calls) == 3                                    # replays run no Python

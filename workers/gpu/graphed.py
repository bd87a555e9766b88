"""CUDA graphs of a module's forward: one graph per input signature, captured on first use, replayed after.

Eager diffusion models are host-bound on the benchmark machine: an SDXL UNet forward launches ~2,000 kernels
and costs ~100 ms of host time against ~35 ms of GPU work (bench/RESULTS.md). A graph replays the whole
forward with one launch and the same kernels, so the result is the eager result (checked at capture).

:func:`install` replaces ``module.forward`` on the instance (pipelines call ``module(...)`` as usual). A call
is replayed when it runs without autograd, every tensor argument is on the module's CUDA device and every
other argument is hashable; the signature (the argument tree, each tensor's shape, stride and dtype, each
other value) picks the graph. Anything else, and every call after a failed capture, runs eagerly.

Capture follows the usual pattern (capture.py, shared with workers/chat/graphs.py): one eager warm-up call on
a side stream, then the capture, all graphs of the module sharing one memory pool. Sharing is safe because
replays never overlap and each replay's outputs are copied out before anything else runs: a later graph may
reuse an earlier one's scratch memory, never memory that is read after its own replay.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .capture import capture, check_replay, settle

log = logging.getLogger(__name__)

WARM_UP_CALLS = 1
DEFAULT_LIMIT = 16          # graphs kept per module (least recently used dropped first)


class SharedPool:
    """One CUDA graph memory pool for several modules' graphs (their replays never overlap either)."""

    def __init__(self) -> None:
        self.handle: Any = None


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]      # static input buffers, in the order of the tensor leaves
    outputs: Any                    # the output tree of the captured call (overwritten by every replay)


class ForwardGraphs:
    """The graphs of one module's forward (what :func:`install` puts in place of ``module.forward``)."""

    def __init__(self, name: str, eager: Callable[..., Any], device: torch.device, limit: int = DEFAULT_LIMIT,
                 weights: Callable[[], Any] = lambda: None, pool: SharedPool | None = None,
                 accept: Callable[[list[Any]], bool] | None = None):
        self.name = name
        self.eager = eager
        self.device = device
        self.limit = limit
        self._weights = weights             # where the weights live now; a graph reads them by address
        self._captured_weights: Any = None
        self._shared = pool or SharedPool()
        self._accept = accept               # which calls may be graphed (by their flattened arguments)
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._eager_only: set[tuple] = set()    # signatures whose capture ran out of memory
        self.failure: str | None = None
        self.replays = 0
        self.eager_calls = 0
        self.capture_seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._graphs and self._weights() != self._captured_weights:
            log.info("%s: the weights moved (cast or reloaded); capturing again", self.name)
            self.release()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._key(leaves, spec)
        if key is None or key in self._eager_only:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, leaves, spec)
            if entry is None:
                self.eager_calls += 1
                return self.eager(*args, **kwargs)
        else:
            self._graphs.move_to_end(key)
            for static, leaf in zip(entry.inputs, _tensors(leaves)):
                static.copy_(leaf)
            entry.graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.outputs)

    def _key(self, leaves: list[Any], spec: Any) -> tuple | None:
        """The call's signature, or None when it must run eagerly."""
        if self.failure is not None or torch.is_grad_enabled():
            return None
        if self._accept is not None and not self._accept(leaves):
            return None
        parts: list[Any] = [torch.is_inference_mode_enabled()]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device or leaf.requires_grad:
                    return None
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return None
                parts.append((type(leaf), leaf))
        return (str(spec), tuple(parts))

    def _capture(self, key: tuple, leaves: list[Any], spec: Any) -> _Entry | None:
        started = time.perf_counter()
        inputs = [static_like(t) for t in _tensors(leaves)]
        feed = iter(inputs)
        args, kwargs = pytree.tree_unflatten([next(feed) if isinstance(x, torch.Tensor) else x for x in leaves],
                                             spec)
        try:
            captured = capture(lambda: self.eager(*args, **kwargs), device=self.device, pool=self._shared.handle,
                               warm_up=WARM_UP_CALLS)
            self._shared.handle = captured.graph.pool()
            odd = [type(x).__name__ for x in pytree.tree_leaves(captured.outputs)
                   if not isinstance(x, (torch.Tensor, int, float, bool, str, type(None)))]
            if odd:   # a replay would hand out objects whose tensors the next replay overwrites
                raise RuntimeError(f"outputs hold objects the graph cannot copy out: {', '.join(odd)}")
            check_replay(captured)
        except torch.cuda.OutOfMemoryError:
            log.warning("%s: not enough GPU memory to capture a graph for this shape; it runs eagerly", self.name)
            self._eager_only.add(key)
            settle(self.device)
            return None
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly, never fail the job
            self.disable(f"{type(exc).__name__}: {exc}"[:300])
            return None
        self._graphs[key] = _Entry(captured.graph, inputs, captured.outputs)
        self._captured_weights = self._weights()
        while len(self._graphs) > self.limit:
            self._graphs.popitem(last=False)
        elapsed = time.perf_counter() - started
        self.capture_seconds += elapsed
        log.info("%s: captured a CUDA graph in %.2f s (%d kept)", self.name, elapsed, len(self._graphs))
        return self._graphs[key]

    def release(self) -> None:
        """Drop every graph and its memory pool (after an out-of-memory error); shapes are captured again
        on their next call."""
        self._graphs.clear()
        self._shared.handle = None

    def disable(self, reason: str) -> None:
        log.warning("CUDA graphs disabled for %s (running eagerly): %s", self.name, reason)
        self.failure = reason
        self.release()
        settle(self.device)

    def describe(self) -> dict[str, Any]:
        return {"graphs": len(self._graphs), "replays": self.replays, "eager_calls": self.eager_calls,
                "capture_seconds": round(self.capture_seconds, 2), "failure": self.failure}


def install(module: torch.nn.Module, name: str, limit: int = DEFAULT_LIMIT, pool: SharedPool | None = None,
            accept: Callable[[list[Any]], bool] | None = None) -> ForwardGraphs | None:
    """Replace ``module.forward`` with its graphed twin; None (nothing changed) off CUDA. ``pool`` shares one
    memory pool with other modules' graphs; ``accept(leaves)`` limits graphs to some calls (others run
    eagerly), e.g. to shapes whose activations are worth keeping in the pool."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return None
    params = list(module.parameters())

    def weights() -> tuple[int, ...]:
        return (address(params[0]), address(params[-1]), params[0].dtype.itemsize)

    graphs = ForwardGraphs(name, module.forward, parameter.device, limit, weights, pool, accept)
    module.forward = functools.update_wrapper(  # type: ignore[method-assign]
        lambda *args, **kwargs: graphs(*args, **kwargs), module.forward)
    module.forward.graphs = graphs  # type: ignore[attr-defined]
    return graphs


def uninstall(module: torch.nn.Module) -> None:
    """Back to the class's own forward (drops the graphs and their memory)."""
    if "forward" in vars(module) and hasattr(module.forward, "graphs"):
        del module.forward


def graphs_of(module: torch.nn.Module) -> ForwardGraphs | None:
    return getattr(vars(module).get("forward"), "graphs", None)


def address(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s data lives: its ``data_ptr``, or for a wrapper subclass without storage of its own
    (torchao's ``Float8Tensor`` weights, WAN_FP8) its first inner tensor's."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return tensor.data_ptr()
    names, _ = flatten(tensor)
    return address(getattr(tensor, names[0]))


def static_like(tensor: torch.Tensor) -> torch.Tensor:
    """A buffer holding ``tensor``'s values that every later call's argument can be copied into: its layout
    when that is dense, else a dense one (``preserve_format``): an expanded argument, e.g. WAN's
    ``t.expand(batch)``, has stride 0 and cannot be written element by element."""
    return torch.empty_like(tensor, memory_format=torch.preserve_format).copy_(tensor)


def _tensors(leaves: list[Any]) -> list[torch.Tensor]:
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

"""FP8 linear layers through torchao, opt-in (``WAN_FP8``, ``CHAT_FP8``): e4m3 weights with one scale per output
row, activations quantised per row (per token) on the fly, the product as ``torch._scaled_mm``.

The recipe is torchao 0.17's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` applied by
``quantize_``: each converted ``nn.Linear`` keeps its class and bias, its weight becomes a ``Float8Tensor`` (fp8
data + fp32 row scales). That tensor's ``F.linear`` / ``mm`` / ``addmm_`` quantises the input per row and, on an
H100/H200 without torchao's optional mslk kernels, calls ``torch._scaled_mm`` with row-wise scales for any number
of rows, one included: a chat decode step's few rows and a video's 32k tokens take the same FP8 GEMM, reading
half the weight bytes of bf16. Row-wise activation scales keep rows independent (a chat row's tokens never
depend on its batch neighbours). Everything is plain tensor ops, so CUDA graphs capture it and ``torch.compile``
traces it (the subclass flattens to its two tensors).

Choices beyond torchao's defaults, each for a reason:

- Only bf16 weights of both dimensions a multiple of 16 are converted (``select``): torchao refuses other dtypes
  with row-wise scales (diffusers' fp32 keep-modules) and leaves other shapes alone silently; a weight with an
  all-zero row is kept in bf16 too, since its scale would be 0 and its fp8 data 0/0 = NaN.
- ``activation_value_lb``: an all-zero activation row (a left-padded prompt's padding rows come out of SDPA as
  zeros) would get scale 0 and turn into NaN, which attention then spreads to the real rows; a floor of
  ``ACTIVATION_FLOOR`` gives it a tiny scale and exact zeros instead.
- ``set_inductor_config=False``: torchao would otherwise change process-wide inductor options and switch fp32
  matrix products to TF32 (``torch.set_float32_matmul_precision("high")``): the fp32 VAE and norms would change
  their math too, beyond the layers asked for.

Speed: the per-row quantisation of the input is about eight small kernels per layer when run eagerly (a CUDA
graph replays them without host cost, but each still takes a few microseconds: a chat decode step has 112
layers); compiled (``COMPILE_BLOCKS`` for WAN, ``CHAT_COMPILE_DECODE`` for chat) inductor fuses them into one or
two. It changes the math (3 mantissa bits: about 3.5 % relative error per product of random operands, 13 % on
the output of one random-weight Qwen2.5-7B layer), so nothing turns it on by default. This module imports
torchao only when FP8 is asked for (``is_float8`` never imports it), so a worker runs without it installed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)        # Ada / Hopper and later: the GPUs with FP8 tensor cores
ALIGNMENT = 16                 # torch._scaled_mm: both dimensions of the weight a multiple of 16
ACTIVATION_FLOOR = 1e-12       # smallest per-row activation maximum used for a scale (see the module doc)
TORCHAO = "torchao==0.17.0"
SKIPPED = "FP8 needs CUDA capability ≥ 8.9"


@dataclass(frozen=True)
class Selection:
    """Which linear layers of some blocks FP8 converts (``names``, as ``named_modules`` spells them) and which
    it keeps, with why (``kept``: name -> reason)."""

    names: tuple[str, ...]
    kept: dict[str, str] = field(default_factory=dict)


def unavailable_reason(device: torch.device) -> str | None:
    """Why FP8 cannot run on ``device`` (None: it can): no CUDA device, one below compute capability 8.9, or no
    torchao."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{SKIPPED}; the device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{SKIPPED}; {name} has {capability[0]}.{capability[1]}"
    try:
        import torchao.quantization  # noqa: F401 - only whether it imports
    except ImportError as exc:
        return f"FP8 needs {TORCHAO} ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def require(device: torch.device, setting: str) -> None:
    """``ConfigError`` naming ``setting`` when FP8 cannot run on ``device``: a worker asked for FP8 must not
    start without it (nor silently serve bf16)."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise ConfigError(f"{setting} is on but {reason}")


def select(model: torch.nn.Module, block_classes: Iterable[str]) -> Selection:
    """The ``nn.Linear`` layers inside ``model``'s submodules of class ``block_classes`` that FP8 converts (bf16,
    dimensions multiples of 16, no all-zero row); the others of those blocks in ``kept``. Reads the weights,
    converts nothing."""
    import torch

    classes = set(block_classes)
    names: dict[str, None] = {}     # ordered, and a nested block's layers are seen once
    kept: dict[str, str] = {}
    for block_name, block in model.named_modules():
        if type(block).__name__ not in classes:
            continue
        for name, module in block.named_modules(prefix=block_name):
            if not isinstance(module, torch.nn.Linear) or name in kept or name in names:
                continue
            reason = _kept_because(module.weight)
            if reason is None:
                names[name] = None
            else:
                kept[name] = reason
    return Selection(tuple(names), kept)


def _kept_because(weight: torch.Tensor) -> str | None:
    import torch

    if is_float8(weight):
        return "already fp8"
    if weight.dtype != torch.bfloat16:
        return f"{str(weight.dtype).removeprefix('torch.')} weight (row-wise FP8 takes bf16 only)"
    if weight.ndim != 2 or any(size % ALIGNMENT for size in weight.shape):
        return f"shape {list(weight.shape)} (_scaled_mm needs multiples of {ALIGNMENT})"
    with torch.no_grad():
        if not bool((weight.abs().amax(dim=1) > 0).all()):
            return "an all-zero weight row (its scale would be 0)"
    return None


def config() -> Any:
    """The torchao configuration every FP8 conversion uses (see the module doc for the choices)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=ACTIVATION_FLOOR,
                                                     set_inductor_config=False)


def quantise(model: torch.nn.Module, selection: Selection) -> int:
    """Convert the selected layers of ``model`` in place (torchao's ``quantize_``); returns how many. Call it
    before compiling or capturing graphs: they must see the fp8 weights. ``RuntimeError`` when torchao refuses a
    layer or leaves one unconverted."""
    from torchao.quantization import quantize_

    wanted = set(selection.names)
    if not wanted:
        return 0
    try:
        quantize_(model, config(), filter_fn=lambda _module, name: name in wanted)
    except AssertionError as exc:   # torchao states its preconditions as asserts
        raise RuntimeError(f"torchao refused an FP8 conversion: {exc}") from None
    modules = dict(model.named_modules())
    missed = [name for name in selection.names if not is_float8(modules[name].weight)]
    if missed:
        raise RuntimeError(f"torchao left {len(missed)} selected layers unconverted, e.g. {missed[0]}")
    log.info("converted %d linear layers of %s to FP8 (%d kept)", len(wanted), type(model).__name__,
             len(selection.kept))
    return len(wanted)


def is_float8(tensor: Any) -> bool:
    """Whether ``tensor`` is torchao's ``Float8Tensor`` (False, without importing torchao, when nothing did)."""
    import sys

    if "torchao" not in sys.modules:
        return False
    from torchao.quantization import Float8Tensor

    return isinstance(tensor, Float8Tensor)


"""Regional compilation: ``torch.compile`` of a model's repeated blocks instead of the whole model.

The SDXL UNet repeats one transformer block 70 times and the WAN transformer one block 30 times. Compiling
each block in place (dynamic shapes) lets every instance share one compiled graph: measured on an H100
(`python -m bench levers`) ~10 s of compile for the UNet's blocks against ~110 s per shape for the whole UNet,
and a UNet step 10 % faster inside the CUDA graphs (the norms, GEGLU and attention reshapes fused). The fused
kernels round in another order (relative error ~1e-3 in fp16): no change to the math.

Compiled blocks are what a CUDA graph then captures (workers/gpu/graphed.py), so the warm-up that captures
the graphs also does the compile. A compile failure (no Triton, an unsupported op) must not take the worker
down: ``suppress_errors`` makes dynamo run that block eagerly and log why. Unloading still frees the model:
dynamo takes each block as an input of the shared graph and keeps no reference to it (a dropped model is
collected, and a reloaded one reuses the compiled graph without compiling again).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 32   # compiled variants kept per block code (dynamic shapes need one or two)


def compile_blocks(model: torch.nn.Module, class_names: tuple[str, ...]) -> int:
    """Compile, in place, every submodule of ``model`` whose class name is in ``class_names`` (dynamic shapes:
    one compile serves every batch and size; a failed compile leaves the plain block). Returns how many
    blocks; nothing happens off CUDA."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return 0
    torch._dynamo.config.suppress_errors = True
    count = compile_matching(model, class_names)
    log.info("compiled %d blocks (%s) of %s", count, ", ".join(class_names), type(model).__name__)
    return count


def compile_matching(model: torch.nn.Module, class_names: tuple[str, ...], dynamic: bool = True,
                     backend: str = "inductor") -> int:
    """``torch.compile`` in place every submodule whose class name is in ``class_names``, on any device (what
    ``compile_blocks`` does on CUDA; bench/levers.py also compiles static shapes, or with dynamo's eager
    backend on the CPU). Returns how many."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):   # the name changed across torch versions
        if hasattr(config, name) and getattr(config, name) < RECOMPILE_LIMIT:
            setattr(config, name, RECOMPILE_LIMIT)
    blocks = [module for module in model.modules() if type(module).__name__ in class_names]
    for block in blocks:
        block.compile(dynamic=dynamic, backend=backend)
    return len(blocks)


def uncompile_blocks(model: torch.nn.Module) -> int:
    """Back to the plain blocks (e.g. to run the model in another dtype as a reference); returns how many."""
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for module in compiled:
        module._compiled_call_impl = None
    return len(compiled)


def compiled_blocks(model: torch.nn.Module) -> int:
    """How many submodules of ``model`` are compiled in place."""
    return sum(1 for module in model.modules() if getattr(module, "_compiled_call_impl", None) is not None)

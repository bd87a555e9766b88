"""Fused projection weights that cost no memory: [q; k; v] and [gate; up] as one tensor each, the modules'
own parameters becoming views into it.

The lean decode step (decode.py) runs one matrix multiplication where transformers runs three (q, k, v) or
two (gate, up). ``fuse`` allocates the joined tensor once, copies the parts in, and re-points each part's
parameter at its rows of the joined tensor (``param.data = view``). The parameter objects stay the same, so
transformers' own forward (the prefill) reads the same values from the same modules, and each part's old
storage is freed: the model's memory is unchanged (one layer's parts exist twice while that layer is being
fused). Fusing again finds the parts already adjacent in one storage and returns the joined view, no copy.

``fuse_linears`` takes the layers themselves, so that FP8 layers (``CHAT_FP8``: torchao ``Float8Tensor`` weights,
workers/gpu/fp8.py) fuse too: their fp8 data and row scales are joined the same way and each layer's weight
becomes a row slice of the joined ``Float8Tensor``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.gpu.fp8 import is_float8


def fuse_linears(linears: Sequence[torch.nn.Module]) -> torch.Tensor:
    """The joined weight of ``linears`` (``fuse`` of their weights; for FP8 layers ``fuse_float8``)."""
    if linears and is_float8(linears[0].weight):
        return fuse_float8(linears)
    return fuse([linear.weight for linear in linears])


def fuse(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor whose rows are ``parts`` in order ([n_i, ...], same trailing shape, dtype and device),
    sharing storage with them: afterwards every part is a view into the returned tensor."""
    if not parts:
        raise ValueError("nothing to fuse")
    first = parts[0]
    if any(p.shape[1:] != first.shape[1:] or p.dtype != first.dtype or p.device != first.device for p in parts):
        raise ValueError("fused parts must share trailing shape, dtype and device")
    joined = adjacent(parts)
    if joined is not None:
        return joined
    rows = sum(p.shape[0] for p in parts)
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
        start = 0
        for part in parts:
            end = start + part.shape[0]
            fused[start:end].copy_(part)
            part.data = fused[start:end]      # same Parameter object, new (shared) storage
            start = end
    return fused


def adjacent(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The joined view when ``parts`` already lie back to back, contiguous, in one storage (else None)."""
    first = parts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for part in parts:
        if (not part.is_contiguous() or part.untyped_storage().data_ptr() != storage
                or part.storage_offset() != offset):
            return None
        offset += part.numel()
    rows = sum(p.shape[0] for p in parts)
    with torch.inference_mode(False), torch.no_grad():
        return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def fuse_float8(linears: Sequence[torch.nn.Module]) -> torch.Tensor:
    """One ``Float8Tensor`` whose rows are the fp8 weights of ``linears`` in order, each layer's weight re-pointed
    at its rows of it (a new ``Parameter``: a wrapper subclass has no ``.data`` storage to swap). Row-wise scales
    belong to their rows, so joining data and scales is the conversion of the joined weight. Fusing again finds
    both already adjacent and returns the joined view, no copy."""
    from torchao.quantization import Float8Tensor

    parts = [linear.weight for linear in linears]
    if not parts or not all(isinstance(p, Float8Tensor) for p in parts):
        raise ValueError("FP8 fusion takes the Float8Tensor weights of converted linear layers")
    first = parts[0]
    same = ("block_size", "mm_config", "act_quant_kwargs", "kernel_preference", "dtype", "device")
    if any(p.shape[1:] != first.shape[1:] or any(getattr(p, a) != getattr(first, a) for a in same) for p in parts):
        raise ValueError("fused FP8 parts must share their input size, scaling and configuration")
    with torch.inference_mode(False), torch.no_grad():
        data, scale = adjacent([p.qdata for p in parts]), adjacent([p.scale for p in parts])
        if data is None or scale is None:
            data, scale = torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts])
        joined = Float8Tensor(data, scale, list(first.block_size), first.mm_config, first.act_quant_kwargs,
                              first.kernel_preference, first.dtype)
        start = 0
        for linear, part in zip(linears, parts):
            end = start + part.shape[0]
            linear.weight = torch.nn.Parameter(joined[start:end], requires_grad=False)
            start = end
    return joined


def storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what they really occupy)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())

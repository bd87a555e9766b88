"""The device's two ceilings, measured once per run (METHOD.md): a large bf16 matrix product (TFLOP/s) and a
large device-to-device copy (TB/s, bytes read plus written). Only on CUDA; a second or so."""
from __future__ import annotations

import torch

from .context import Context

SECTION = "ceilings"


def run(ctx: Context) -> None:
    if not ctx.profile.cuda:
        ctx.report.detail(SECTION, "skipped", "no CUDA device")
        return
    ctx.step(SECTION, "measure", 10, lambda: _measure(ctx))


def _measure(ctx: Context) -> None:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = _time(lambda: torch.mm(a, b), repeats=20)
    src = torch.randn(2 * 1024 ** 3 // 2, device="cuda", dtype=torch.bfloat16)   # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = _time(lambda: dst.copy_(src), repeats=10)
    moved = 2 * src.numel() * src.element_size()
    ctx.report.detail(SECTION, "bf16_matmul_tflops", round(2 * n ** 3 / (matmul_ms / 1e3) / 1e12, 1))
    ctx.report.detail(SECTION, "copy_tb_s", round(moved / (copy_ms / 1e3) / 1e12, 2))
    print(f"[ceilings] {ctx.report.sections[SECTION]}", flush=True)
    a = b = src = dst = None  # drop the references (free the memory) before what follows
    torch.cuda.empty_cache()


def _time(fn, repeats: int) -> float:
    """Median milliseconds over ``repeats`` runs, after three warm-ups, with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]

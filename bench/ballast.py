"""A process that fills one GPU (``python -m bench.ballast``, with ``CUDA_VISIBLE_DEVICES`` naming the GPU).

Reads commands on stdin and answers each with one JSON line on stdout:

    fill <GiB>   allocate (1 GiB blocks, then the rest) until the device has at most <GiB> free
    release      free everything it holds
    status       what it holds and what the device has free

The fleet benchmark uses it to make a GPU genuinely full (what NVML, and so the memory manager, sees),
not just full in the memory manager's ledger. EOF on stdin ends it.
"""
from __future__ import annotations

import json
import sys

GIB = 1 << 30


def main() -> int:
    import torch

    torch.cuda.init()
    held: list = []

    def state(**extra) -> dict:
        free, total = torch.cuda.mem_get_info()
        return {"free_gib": round(free / GIB, 2), "total_gib": round(total / GIB, 2),
                "held_gib": round(sum(t.numel() for t in held) / GIB, 2), **extra}

    print(json.dumps(state(ready=True, device=torch.cuda.get_device_name())), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "fill" and len(words) == 2:
            target = float(words[1]) * GIB
            while True:
                free, _ = torch.cuda.mem_get_info()
                excess = int(free - target)
                if excess < 64 << 20:  # within 64 MiB of the target
                    break
                block = min(GIB, excess - (excess % (2 << 20)) or excess)
                try:
                    held.append(torch.empty(block, dtype=torch.uint8, device="cuda"))
                except torch.OutOfMemoryError:
                    break
            print(json.dumps(state(filled=True)), flush=True)
        elif words[0] == "release":
            held.clear()
            torch.cuda.empty_cache()
            print(json.dumps(state(released=True)), flush=True)
        elif words[0] == "status":
            print(json.dumps(state()), flush=True)
        else:
            print(json.dumps(state(error=f"unknown command {words[0]!r}")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

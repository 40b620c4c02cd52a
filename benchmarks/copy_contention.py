"""Does loading the next layer slow the layer computing meanwhile? One Mixtral-8x7B-shaped micro-batch (8 experts,
8,192 tokens, bf16) timed alone and while another thread copies 2 GB from pageable host memory to the GPU in a
loop, (a) as ``Module.to`` does (one copy per tensor) and (b) as ``mop_ray.arch.layer.to_device`` does (two pinned
64 MB buffers, asynchronous copies).

    python benchmarks/copy_contention.py          (CUDA only; results: benchmarks/RESULTS.md)
"""

from __future__ import annotations

import threading
import time

import torch

from mop_ray.arch.experts import expert_forward
from mop_ray.arch.layer import to_device


def main() -> None:
    dev = "cuda"
    ex = torch.nn.Module()
    ex.gate_up_proj = torch.randn(8, 2 * 14336, 4096, device=dev, dtype=torch.bfloat16) * 0.01  # [E, 2I, H]
    ex.down_proj = torch.randn(8, 4096, 14336, device=dev, dtype=torch.bfloat16) * 0.01  # [E, H, I]
    ex.act_fn = torch.nn.SiLU()
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)  # [T, H]

    def compute(n: int = 5) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            for e in range(8):
                expert_forward(ex, x, e)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1000

    compute(3)
    print("alone: ms per micro-batch", round(compute(), 2), flush=True)
    src = torch.empty(2**30, dtype=torch.bfloat16).fill_(1)  # 2 GB, pageable
    for name in ("Module.to", "to_device"):
        stop, count = threading.Event(), [0, 0.0]

        def copier():
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                while not stop.is_set():
                    t = time.perf_counter()
                    host = torch.nn.Module()
                    host.w = torch.nn.Parameter(src, requires_grad=False)
                    host.to(dev) if name == "Module.to" else to_device(host, dev)
                    side.synchronize()
                    count[0] += 1
                    count[1] += time.perf_counter() - t

        th = threading.Thread(target=copier)
        th.start()
        time.sleep(0.5)
        ms = compute()
        stop.set()
        th.join()
        print(f"{name} copying meanwhile: ms per micro-batch {ms:.2f}; copies {count[0]} at "
              f"{2 * count[0] / max(count[1], 1e-9):.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()

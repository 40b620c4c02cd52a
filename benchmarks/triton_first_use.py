"""What a fresh process pays for the fused kernels' first use: importing Triton, its driver, each kernel's first
launch (compiled into ``~/.triton/cache`` the first time, loaded from it after).

    python benchmarks/triton_first_use.py      (on a GPU; run it twice: the second run finds the cache)

The shapes are a Mixtral-8x7B-shaped micro-batch's (8,192 tokens, hidden 4096, expert hidden 14336, 8 experts).
"""

import sys
import time
from pathlib import Path

t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
gate_up = torch.randn(8192, 2 * 14336, device="cuda", dtype=torch.bfloat16)  # [T, 2I]
torch.cuda.synchronize()
t2 = time.perf_counter()
import triton  # noqa: E402, F401 - timed on its own

t3 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mop_ray.arch import kernels  # noqa: E402

assert kernels.fused(gate_up), "the kernels do not run here (no CUDA tensor, no Triton, or MOP_RAY_FUSED=0)"
t4 = time.perf_counter()
kernels.swiglu(gate_up, torch.nn.SiLU())
torch.cuda.synchronize()
t5 = time.perf_counter()
f = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)  # [T, H] one expert's output
base = torch.randn(8192, 4096, device="cuda")  # [T, H] float32
c, err, norm = (torch.rand(8192, 8, device="cuda") for _ in range(3))  # [T, E]
torch.cuda.synchronize()
t6 = time.perf_counter()
kernels.error_and_norm(f, base, c[:, 0], err[:, 0], norm[:, 0])
torch.cuda.synchronize()
t7 = time.perf_counter()
kernels.swiglu(gate_up, torch.nn.SiLU())
kernels.error_and_norm(f, base, c[:, 1], err[:, 1], norm[:, 1])
torch.cuda.synchronize()
t8 = time.perf_counter()
print(f"torch import {t1 - t0:.2f}  cuda init {t2 - t1:.2f}  triton import {t3 - t2:.2f}  kernels module {t4 - t3:.2f}  "
      f"first swiglu {t5 - t4:.3f}  first error_and_norm {t7 - t6:.3f}  both again {t8 - t7:.4f}")

"""The fused kernels (mop_ray.arch.kernels) against the torch code they replace, on real layer shapes.

    python benchmarks/kernel_speed.py --out-json kernel-speed.json      (on a GPU)

One micro-batch of T tokens (default 8,192, a wave's call) through random bf16 experts:
- ``swiglu`` on the gate/up projection [T, 2I] and ``error_and_norm`` on one expert's output [T, H], each timed
  with the kernels off (``MOP_RAY_FUSED=0``, torch) and on, with the bandwidth each reaches on the bytes it must
  move (read 2·T·I + write T·I; read T·H in bf16 + T·H in float32);
- ``combine`` (the block's output from the stacked expert outputs [E, T, H] and the top-k ids and gates), with
  the bandwidth on the bytes the kernel must move (read k·T·H, write T·H, bf16);
- the observer's whole all-experts call (``MoEObserver.forward``: the experts, z, and the statistics) of a
  Mixtral-8x7B-shaped layer (8 × [4096 → 14336], top-2), off and on, next to its matmuls alone (the floor);
- the same for DeepSeek-V3-shaped experts (16 of its 256 × [7168 → 2048], top-8 of 16, sigmoid router): its
  expert hidden is 7× smaller, so the elementwise work weighs 7× more against the matmuls.
Every timing is the median of ``--repeat`` GPU-synchronised calls after two warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from enu_speed import Moe, NoShared  # noqa: E402
from mop_ray.arch import RouterSpec  # noqa: E402
from mop_ray.arch.experts import expert_forward  # noqa: E402
from mop_ray.arch.kernels import combine, error_and_norm, fused, swiglu  # noqa: E402
from mop_ray.observe.observer import MoEObserver  # noqa: E402


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after two warm-up calls, each GPU-synchronised."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def both(fn, repeat: int) -> dict:
    """{"torch": s, "fused": s, "speed-up": ×} of ``fn`` with the kernels off, then on."""
    out = {}
    for name, flag in (("torch", "0"), ("fused", "1")):
        os.environ["MOP_RAY_FUSED"] = flag
        out[name] = timed(fn, repeat)
    out["speed-up"] = out["torch"] / out["fused"]
    return out


@torch.no_grad()
def layer(name: str, n: int, hidden: int, inter: int, spec: RouterSpec, tokens: int, repeat: int) -> dict:
    dev = torch.device("cuda")
    moe = Moe(n, hidden, inter, torch.bfloat16, dev)
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)  # [T, H]
    source, block, pos = torch.arange(tokens) % 6, torch.zeros(tokens, dtype=torch.long), torch.arange(tokens)
    res = {"shape": {"experts": n, "hidden": hidden, "expert_hidden": inter, "tokens": tokens}}

    gate_up = torch.nn.functional.linear(x, moe.experts.gate_up_proj[0])  # [T, 2I]
    t = both(lambda: swiglu(gate_up, moe.experts.act_fn), repeat)
    t["GB/s"] = {k: 3 * tokens * inter * 2 / t[k] / 1e9 for k in ("torch", "fused")}
    res["swiglu"] = t

    f = expert_forward(moe.experts, x, 0)  # [T, H] bf16
    base = torch.randn(tokens, hidden, device=dev)  # [T, H] float32
    c, err, norm = (torch.rand(tokens, n, device=dev) for _ in range(3))  # [T, E]
    t = both(lambda: error_and_norm(f, base, c[:, 0], err[:, 0], norm[:, 0]), repeat)
    t["GB/s"] = {k: tokens * hidden * 6 / t[k] / 1e9 for k in ("torch", "fused")}
    res["error_and_norm"] = t

    outputs = torch.randn(n, tokens, hidden, device=dev, dtype=torch.bfloat16)  # [E, T, H]
    idx = torch.rand(tokens, n, device=dev).topk(spec.top_k, dim=1).indices  # [T, k]
    w = torch.rand(tokens, spec.top_k, device=dev)  # [T, k] float32
    t = both(lambda: combine(outputs, idx, w, None, torch.bfloat16), repeat)
    t["GB/s"] = {k: (spec.top_k + 1) * tokens * hidden * 2 / t[k] / 1e9 for k in ("torch", "fused")}
    res["combine"] = t

    def matmuls():
        for e in range(n):
            h = torch.nn.functional.linear(x, moe.experts.gate_up_proj[e])[:, :inter]
            torch.nn.functional.linear(h, moe.experts.down_proj[e])

    res["matmuls_s"] = timed(matmuls, repeat)
    flops = n * tokens * hidden * inter * 3 * 2
    res["matmul_TFLOPs"] = flops / res["matmuls_s"] / 1e12

    def observe():
        obs = MoEObserver(0, NoShared(), spec, n, 6, None)
        obs.forward(moe, x, source, None, block, pos)

    t = both(observe, repeat)
    t["over_matmuls"] = {k: t[k] / res["matmuls_s"] for k in ("torch", "fused")}
    res["observer_call"] = t
    print(f"{name}: swiglu {res['swiglu']['torch'] * 1e3:.2f} -> {res['swiglu']['fused'] * 1e3:.2f} ms, "
          f"error_and_norm {res['error_and_norm']['torch'] * 1e3:.2f} -> {res['error_and_norm']['fused'] * 1e3:.2f}"
          f" ms, combine {res['combine']['torch'] * 1e3:.2f} -> {res['combine']['fused'] * 1e3:.2f} ms"
          f", observer call {t['torch'] * 1e3:.1f} -> {t['fused'] * 1e3:.1f} ms "
          f"(matmuls alone {res['matmuls_s'] * 1e3:.1f} ms, {res['matmul_TFLOPs']:.0f} TFLOP/s)", flush=True)
    return res  # the layer's weights go with this frame


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out-json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_speed.py: needs a CUDA GPU (the kernels run on CUDA tensors only)")
    probe = torch.empty(1, device="cuda")
    os.environ.pop("MOP_RAY_FUSED", None)
    if not fused(probe):
        raise SystemExit("kernel_speed.py: Triton does not import here, so the kernels cannot run")
    import triton

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "mixtral": layer("mixtral-8x7b", 8, 4096, 14336, RouterSpec(top_k=2), args.tokens, args.repeat),
              "deepseek_v3": layer("deepseek-v3 (16 experts)", 16, 7168, 2048,
                                   RouterSpec(top_k=8, scoring="sigmoid", norm_topk_prob=True,
                                              routed_scaling_factor=2.5), args.tokens, args.repeat)}
    if args.out_json:
        with open(args.out_json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

"""Enu on one Mixtral-8x7B-shaped layer: the fast scorer vs an efficient masked-forward-per-subset procedure.

    python benchmarks/enu_speed.py --tokens 262144 --keep 4 --out result.json      (on a GPU)

One MoE layer (8 experts, hidden 4096, expert hidden 14336, bf16, random weights), N calibration tokens.
Three timings, all in one run, after a warm-up, with CUDA synchronisation:
- floor:   every expert once on every token (8 pairs of grouped matmuls) — the cost no scorer can avoid;
- fast:    mop_ray's scorer: all experts once → per-token inner products (float64) → all C(8, r) sets scored
           from the products and the router logits (``mop_ray.methods.enu.search``);
- masked:  NAEE's procedure done efficiently: for each of the C(8, r) sets, mask dropped router logits,
           route, run each kept expert only on its routed tokens (the transformers eager experts loop),
           accumulate the Frobenius loss over 16 batches in float64.
Both scorers must choose the same set. Results go to benchmarks/RESULTS.md by hand, with this command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from mop_ray.arch import RouterSpec, route
from mop_ray.arch.experts import expert_forward
from mop_ray.methods.enu import search
from mop_ray.methods.products import expert_products


class Experts(torch.nn.Module):
    def __init__(self, n, hidden, inter, dtype, device):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(n, 2 * inter, hidden, generator=g, device=device, dtype=dtype) * hidden ** -0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(n, hidden, inter, generator=g, device=device, dtype=dtype) * inter ** -0.5)
        self.act_fn = torch.nn.SiLU()


class Gate(torch.nn.Module):
    def __init__(self, n, hidden, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, hidden, device=device) * hidden ** -0.5)


class Moe(torch.nn.Module):
    def __init__(self, n, hidden, inter, dtype, device):
        super().__init__()
        self.experts, self.gate = Experts(n, hidden, inter, dtype, device), Gate(n, hidden, device)


class NoShared:
    def shared_output(self, moe, x):
        return None


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat=1):
    """(mean seconds over ``repeat`` calls after one warm-up call, the last result), GPU-synchronised."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        res = fn()
    sync()
    return (time.perf_counter() - t) / repeat, res


@torch.no_grad()
def moe_output(moe, spec, x, logits, keep=None, chunk=32768, bias=None):
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        idx, w = route(spec, logits[s:s + chunk], bias, keep=keep)
        o = torch.zeros(xs.shape, dtype=torch.float32, device=x.device)
        for e in range(moe.gate.weight.shape[0]):
            tok, slot = torch.where(idx == e)
            if len(tok):
                o.index_add_(0, tok, (w[tok, slot, None] * expert_forward(moe.experts, xs[tok], e).float()))
        out[s:s + chunk] = o.to(x.dtype)
    return out


@torch.no_grad()
def masked_enumeration(moe, spec, x, z, logits, batch, r):
    n = logits.shape[1]
    best = None
    for kept in itertools.combinations(range(n), r):
        keep = torch.zeros(n, dtype=torch.bool, device=x.device)
        keep[list(kept)] = True
        out = moe_output(moe, spec, x, logits, keep)
        err = (z.double() - out.double()).pow(2).sum(-1)
        loss = float(torch.zeros(int(batch.max()) + 1, dtype=torch.float64, device=x.device).index_add_(0, batch, err).sqrt().sum())
        if best is None or (loss, kept) < best:
            best = (loss, kept)
    return list(best[1]), best[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    moe = Moe(args.experts, args.hidden, args.inter, dtype, dev).eval()
    spec = RouterSpec(top_k=2, scoring="softmax", norm_topk_prob=True)
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype)
    logits = torch.nn.functional.linear(x.float(), moe.gate.weight)  # [N, E]
    z = moe_output(moe, spec, x, logits)  # original MoE output
    batch = torch.arange(args.tokens, device=dev) * 16 // args.tokens  # 16 NAEE batches

    def floor():
        with torch.no_grad():
            for s in range(0, args.tokens, 32768):
                for e in range(args.experts):
                    expert_forward(moe.experts, x[s:s + 32768], e)

    def fast():
        prods = expert_products(moe, NoShared(), spec, x, z, logits, min_kept=args.keep)
        return search(prods, batch, args.experts, args.keep)

    t_floor, _ = timed(floor, 3)
    t_fast, (kept_fast, details) = timed(fast, 2)
    t_masked, (kept_masked, loss_masked) = timed(lambda: masked_enumeration(moe, spec, x, z, logits, batch, args.keep))
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
        "tokens": args.tokens, "experts": args.experts, "keep": args.keep, "hidden": args.hidden, "inter": args.inter,
        "sets": details["sets_scored"], "floor_s": round(t_floor, 4), "fast_s": round(t_fast, 4),
        "masked_s": round(t_masked, 4), "fast_over_floor": round(t_fast / t_floor, 3),
        "masked_over_fast": round(t_masked / t_fast, 2), "same_choice": kept_fast == kept_masked,
        "kept": kept_fast, "loss_fast": details["loss"], "loss_masked": loss_masked,
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

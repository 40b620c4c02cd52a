"""Greedy enu and MoP selection on one DeepSeek-V3-shaped MoE layer: per-layer time vs the all-experts floor.

    python benchmarks/greedy_speed.py --tokens 65536 --keep 128 --out greedy-dsv3.json        (on a GPU)

One MoE layer with DeepSeek-V3's routed experts (256 × [7168 → 2048], bf16, random weights; sigmoid router with
correction bias, n_group 8, topk_group 4, top-8, routed scaling 2.5), N sampled tokens whose MoE output z is
the layer's own. Timed after a warm-up, CUDA-synchronised, in one run:
- probe:    a large bf16 matmul's TFLOP/s on this device;
- floor:    the all-experts compute floor of the sample, FLOPs(every expert on every token) / probe TFLOP/s,
            and the same pass measured (every expert on every token, nothing kept);
- products: mop_ray's one pass over all experts → per-token products (``expert_products``);
- enu:      greedy enu 256 → keep (``search``), incremental trials;
- mop:      MoP at 256 → keep: greedy to m = keep/2 general experts, K-Means (K = keep − m) on the sampled
            inputs, per-domain errors, Spearman/Ward per routing group, S_var pick.
Exactness: the first greedy step's trial losses for 16 experts are checked against a full rescoring pass
(``set_loss``). Results go to benchmarks/RESULTS.md by hand, with this command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from enu_speed import NoShared, moe_output, sync  # noqa: E402
from speed import matmul_probe  # noqa: E402

from mop_ray.arch import RouterSpec  # noqa: E402
from mop_ray.arch.experts import expert_forward  # noqa: E402
from mop_ray.methods.enu import search, set_loss  # noqa: E402
from mop_ray.methods.greedy import trial_losses  # noqa: E402
from mop_ray.methods.mosaic import activation_variability, kmeans, seeding_draws, spearman_ward  # noqa: E402
from mop_ray.methods.products import expert_products  # noqa: E402
from mop_ray.observe.observer import single_expert_weight  # noqa: E402


class Experts(torch.nn.Module):
    def __init__(self, n, hidden, inter, dtype, device, gen):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.empty(n, 2 * inter, hidden, device=device, dtype=dtype))
        self.down_proj = torch.nn.Parameter(torch.empty(n, hidden, inter, device=device, dtype=dtype))
        for e in range(n):  # filled one expert at a time: no float32 copy of all 256
            self.gate_up_proj.data[e] = torch.randn(2 * inter, hidden, generator=gen, device=device) * hidden ** -0.5
            self.down_proj.data[e] = torch.randn(hidden, inter, generator=gen, device=device) * inter ** -0.5
        self.act_fn = torch.nn.SiLU()


class Gate(torch.nn.Module):
    def __init__(self, n, hidden, device, gen):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, hidden, generator=gen, device=device) * hidden ** -0.5)
        self.e_score_correction_bias = torch.randn(n, generator=gen, device=device) * 0.05


class Moe(torch.nn.Module):
    def __init__(self, n, hidden, inter, dtype, device, seed=0):
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(seed)
        self.experts, self.gate = Experts(n, hidden, inter, dtype, device, gen), Gate(n, hidden, device, gen)


def timed(fn):
    sync()
    t = time.perf_counter()
    res = fn()
    sync()
    return time.perf_counter() - t, res


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--keep", type=int, default=128)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--topk-group", type=int, default=4)
    ap.add_argument("--batches", type=int, default=16, help="NAEE loss batches over the sample")
    ap.add_argument("--out")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one greedy enu run")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n, r, groups = args.experts, args.keep, args.groups
    moe = Moe(n, args.hidden, args.inter, dtype, dev).eval()
    spec = RouterSpec(top_k=args.top_k, scoring="sigmoid", norm_topk_prob=True, n_group=groups,
                      topk_group=args.topk_group, group_score="top2_sum", routed_scaling_factor=2.5,
                      has_correction_bias=True)
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=gen, device=dev, dtype=dtype)  # [N, H]
    logits = torch.nn.functional.linear(x.float(), moe.gate.weight)  # [N, E]
    z = moe_output(moe, spec, x, logits, chunk=8192, bias=moe.gate.e_score_correction_bias)  # [N, H] the layer's own output
    batch = torch.arange(args.tokens, device=dev) * args.batches // args.tokens  # [N]

    probe = matmul_probe(dev, "bfloat16" if dev == "cuda" else "float32", 8192 if dev == "cuda" else 1024, 2.0)
    flops = 2 * 3 * args.hidden * args.inter * n * args.tokens  # every expert on every token
    floor_s = flops / (probe["tflops"] * 1e12)

    def all_experts():
        step = 8192
        for s in range(0, args.tokens, step):
            for e in range(n):
                expert_forward(moe.experts, x[s:s + step], e)

    all_experts_s, _ = timed(all_experts)
    torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
    m = r // 2
    products_s, prods = timed(lambda: expert_products(moe, NoShared(), spec, x, z, logits, min_kept=m))
    # exactness of the incremental trials: 16 experts of the first step against full rescoring passes
    full = torch.ones(n, dtype=torch.bool, device=dev)
    check = list(range(0, n, max(1, n // 16)))[:16]
    fast = trial_losses(prods, batch, full, check).tolist()
    ref = []
    for e in check:
        keep = full.clone()
        keep[e] = False
        ref.append(set_loss(prods, batch, keep))
    rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fast, ref))
    enu_s, (kept_enu, det_enu) = timed(lambda: search(prods, batch, n, r, groups, max_sets=0))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            search(prods, batch, n, r, groups, max_sets=0)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total" if dev == "cuda" else "cpu_time_total", row_limit=25))

    parts = {}
    spearman_ward(torch.rand(8, 4).numpy(), 2)  # scipy's (and scikit-learn's) first import: once per process, not per layer

    def mop():  # as mop_ray.methods.mosaic.mop: K-Means' random numbers are drawn on a thread during stage 1
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:
            draws = pool.submit(seeding_draws, args.tokens, r - m, 0)
            general, det = search(prods, batch, n, m, groups, max_sets=0)
            sync()
            parts["mop_general_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            draws = draws.result()
            parts["mop_draws_wait_s"] = round(time.perf_counter() - t0, 3)  # counted in mop_kmeans_s
        p = logits.double().softmax(-1)  # [N, E] MoP Eq. 2 inputs
        s_var = activation_variability(p.sum(0).cpu().numpy(), (p * p.clamp_min(1e-300).log2()).sum(0).cpu().numpy(),
                                       args.tokens)
        t0 = time.perf_counter() - parts["mop_draws_wait_s"]
        domains = kmeans(x, r - m, seed=0, draws=draws)  # [N]
        sync()
        parts["mop_kmeans_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        errors = prods.single_expert_errors(single_expert_weight(spec, logits))  # [N, E]
        counts = torch.bincount(domains, minlength=r - m).double()
        sums = torch.zeros(r - m, n, dtype=torch.float64, device=dev).index_add_(0, domains, errors)
        perf = (sums / counts.clamp_min(1)[:, None]).T.cpu().numpy()  # [E, K]
        size, per = n // groups, (r - m) // groups
        diverse = []
        for g in range(groups):
            cand = [e for e in range(g * size, (g + 1) * size) if e not in general]
            labels = spearman_ward(perf[cand], per)
            for c in range(per):
                diverse.append(max((e for e, lab in zip(cand, labels) if lab == c), key=lambda e: (s_var[e], -e)))
        parts["mop_clusters_s"] = round(time.perf_counter() - t0, 3)
        return sorted(general + diverse), det

    mop_s, (kept_mop, det_mop) = timed(mop)
    assert len(kept_mop) == r == len(kept_enu)
    result = {
        "device": probe["device"], "torch": torch.__version__, "tokens": args.tokens, "experts": n, "keep": r,
        "general": m, "hidden": args.hidden, "inter": args.inter, "top_k": args.top_k, "n_group": groups,
        "topk_group": args.topk_group, "probe_tflops": probe["tflops"], "floor_s": round(floor_s, 3),
        "all_experts_pass_s": round(all_experts_s, 3), "products_s": round(products_s, 3),
        "enu_greedy_s": round(enu_s, 3), "enu_total_s": round(products_s + enu_s, 3),
        "enu_total_over_floor": round((products_s + enu_s) / floor_s, 2),
        "mop_s": round(mop_s, 3), **parts, "mop_total_s": round(products_s + mop_s, 3),
        "mop_total_over_floor": round((products_s + mop_s) / floor_s, 2),
        "candidates": prods.n_candidates, "rebuilt_tokens": prods.refreshed, "rebuilds": prods.refreshes, "direct_pairs": prods.direct,
        "enu_sets_scored": det_enu["sets_scored"], "mop_sets_scored": det_mop["sets_scored"],
        "enu_rescored_tokens": det_enu.get("rescored_tokens"), "mop_rescored_tokens": det_mop.get("rescored_tokens"),
        "first_step_max_rel_diff": rel, "kept_enu": kept_enu, "kept_mop": kept_mop,
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev == "cuda" else None,
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("kept")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

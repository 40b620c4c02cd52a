"""Mosaic Pruning (MoP) and its ablation GVP (Hu et al., AAAI-26, arXiv 2511.19822).

Stage 1 (both): m general experts by the Enu criterion (Eq. 3; ``mop_ray.methods.enu``), m = ⌈r/2⌉ by default
(``--general``; the paper does not state m).
GVP: add the r − m remaining experts with the highest Activation Variability Score.
MoP stage 2: K-Means (K = r − m) on the layer's sampled MoE inputs finds domains; every candidate gets a
performance vector of per-domain mean single-expert errors (Eq. 5–7); candidates are clustered by Spearman
similarity of those vectors (Eq. 8–10) with Ward linkage into exactly r − m clusters (Eq. 11–12), and each
cluster keeps its highest-S_var expert (Eq. 13).

Interpretations where the paper is silent (see README "Methods"): K-Means runs per layer on raw MoE inputs;
Ward runs on centred, L2-normalised rank vectors, for which squared Euclidean distance is 4·D with
D = (1 − ρ)/2, so it is Ward on the paper's Spearman distance; constant performance vectors count as
uncorrelated; with DeepSeek routing groups, m and r − m are split evenly over the groups and stage 2 clusters
each group's candidates separately (domains are shared).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mop_ray.errors import MopError
from mop_ray.methods.base import Choice, LayerContext, register, select
from mop_ray.methods.enu import DEFAULT_MAX_SETS, layer_products, search
from mop_ray.observe.observer import single_expert_weight


def activation_variability(p_sum: np.ndarray, plogp_sum: np.ndarray, n_tokens: int) -> np.ndarray:
    """S_var(i) = Σ_t (p_ti/Z_i)·log2(p_ti·N/Z_i)   (MoP Eq. 2)  = Σ_t p log2 p / Z − log2 Z + log2 N, [n] bits.

    The KL divergence (bits) of expert i's token-normalised full-softmax probabilities from uniform over the
    N calibration tokens: 0 for an expert used evenly on every token, log2 N for one used on a single token.
    """
    p_sum = np.asarray(p_sum, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.asarray(plogp_sum, dtype=np.float64) / p_sum - np.log2(p_sum) + math.log2(n_tokens)
    return np.where(p_sum > 0, s, 0.0)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-6,
           draws: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Lloyd's K-Means with k-means++ seeding on x's device; labels [N]. Best of ``n_init`` by inertia.

    Torch rather than scikit-learn: the sampled hidden states already sit on the selection task's GPU, where
    one Lloyd step over 65k × 7168 inputs takes milliseconds; scikit-learn would copy them to the host and run
    on its cores. Deterministic for a seed on a given device. ``draws``: ``seeding_draws(N, k, seed, n_init)``,
    when the caller drew them ahead (they depend on nothing else; ~0.1 s per run on a host core).
    """
    x = x.float()
    n = x.shape[0]
    if k >= n:
        return torch.arange(n, device=x.device) % k
    best, best_inertia = None, float("inf")
    x2 = x.pow(2).sum(-1)  # [N]
    firsts, q = draws if draws is not None else seeding_draws(n, k, seed, n_init)
    for centers in _seed_centers(x, x2, firsts, q):  # [k, H] each
        prev = None
        for _ in range(max_iter):
            dist = x2[:, None] - 2 * x @ centers.T + centers.pow(2).sum(-1)[None]  # [N, k]
            labels = dist.argmin(-1)
            inertia = float(dist.gather(1, labels[:, None]).clamp_min(0).sum())
            if x.is_cuda:  # one GEMM with the one-hot labels: ~2× index_add_'s atomics at 65k × 7168
                onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype).T  # [k, N]
                sums, counts = onehot @ x, onehot.sum(-1, keepdim=True)  # [k, H], [k, 1]
            else:
                sums = torch.zeros_like(centers).index_add_(0, labels, x)
                counts = torch.bincount(labels, minlength=k).to(x.dtype)[:, None]
            centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
            if prev is not None and prev - inertia <= tol * max(prev, 1e-30):
                break
            prev = inertia
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def seeding_draws(n: int, k: int, seed: int = 0, n_init: int = 3) -> tuple[list[int], torch.Tensor]:
    """The random numbers of ``n_init`` k-means++ seedings over n points: each run's first index and the
    exponentials of its k − 1 draws [k-1, n_init, n], from a CPU generator in the order one run after another
    draws them (what torch.multinomial for one sample draws: it picks argmax(p / q), q ~ Exp(1))."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    firsts, qs = [], []
    for _ in range(n_init):
        firsts.append(int(torch.randint(n, (1,), generator=gen).item()))
        qs.append(torch.empty(k - 1, n).exponential_(generator=gen))  # [k-1, N]
    return firsts, torch.stack(qs, 1)


def _seed_centers(x: torch.Tensor, x2: torch.Tensor, firsts: list[int], q: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding of every run at once [I, k, H]: each next centre drawn ∝ squared distance to the
    nearest chosen one, argmax(p / q) with ``seeding_draws``' exponentials q [k-1, I, N], so the loop runs on x's
    device without a host round trip per centre, reads x once per step for all runs, and picks what a
    host-side multinomial per centre would."""
    n, k = x.shape[0], q.shape[0] + 1
    q = q.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else q
    centers = torch.empty(len(firsts), k, x.shape[1], dtype=x.dtype, device=x.device)  # [I, k, H]
    centers[:, 0] = x[firsts]
    d2 = _sq_dist(x, x2, centers[:, 0])  # [I, N]
    uniform = torch.full_like(d2, 1.0 / n)
    for j in range(1, k):
        total = d2.sum(-1, keepdim=True)  # [I, 1]
        probs = torch.where(total > 0, d2 / total, uniform)  # all points on centres: uniform
        c = x[(probs / q[j - 1]).argmax(-1)]  # [I, H] device indices: no sync
        centers[:, j] = c
        d2 = torch.minimum(d2, _sq_dist(x, x2, c))
    return centers


def _sq_dist(x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """‖x_t − c_i‖² [I, N] for centres c [I, H]: on CUDA one GEMM for all I (x read once); on the host one
    matrix-vector product per centre, as the seeding has always computed them there."""
    if x.is_cuda:
        return (x2[None] - 2 * (c @ x.T) + c.pow(2).sum(-1, keepdim=True)).clamp_min(0)
    return torch.stack([(x2 - 2 * x @ ci + ci.pow(2).sum()).clamp_min(0) for ci in c])


def spearman_ward(perf: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster rows of ``perf`` [c, K] by Spearman similarity with Ward linkage into exactly n_clusters; labels [c].

    Rank vectors (average ranks, Eq. 8) centred and L2-normalised satisfy ‖r̃_i − r̃_j‖² = 2(1 − ρ_ij) = 4·D_ij
    (Eq. 9–10), so Euclidean Ward on them is Ward on the Spearman distance (Eq. 11–12).
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.stats import rankdata

    c = perf.shape[0]
    if n_clusters >= c:
        return np.arange(c)
    if n_clusters <= 1:
        return np.zeros(c, dtype=int)
    ranks = np.apply_along_axis(rankdata, 1, perf)  # [c, K]
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    rt = np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)  # constant rows: ρ = 0 by convention
    labels = fcluster(linkage(rt, method="ward"), t=n_clusters, criterion="maxclust") - 1
    if len(set(labels)) != n_clusters:  # tied merge heights: fcluster may return fewer clusters
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=n_clusters, linkage="ward").fit_predict(rt)
    return np.asarray(labels)


def split_general(r: int, m: int | None, groups: int, min_per_group: int = 1) -> int:
    """m = ⌈r/2⌉ unless given, rounded up to a whole number per routing group."""
    m = math.ceil(r / 2) if m is None else int(m)
    if not 1 <= m <= r:
        raise MopError(f"--general {m}: expected between 1 and --keep {r}")
    per = max(math.ceil(m / groups), min(min_per_group, r // groups)) if groups > 1 else m
    return per * groups


def _stage1(ctx: LayerContext, r: int):
    m = split_general(r, ctx.params.get("general"), ctx.groups)
    prods, batch, (moe, ckpt, sample) = layer_products(ctx, min_kept=m)
    general, enu_details = search(prods, batch, ctx.num_experts, m, ctx.groups,
                                  int(ctx.params.get("enu_max_sets", DEFAULT_MAX_SETS)))
    stats = ctx.records.stats
    s_var = activation_variability(stats.total("p_sum"), stats.total("plogp_sum"), stats.n_tokens)
    return m, general, enu_details, s_var, prods, sample


@register("gvp", needs_records=True, needs_weights=True, set_based=True,
          summary="m general experts by reconstruction loss + the r-m highest activation variability (MoP ablation)")
def gvp(ctx: LayerContext, r: int) -> Choice:
    m, general, enu_details, s_var, _, _ = _stage1(ctx, r)
    cand = [e for e in range(ctx.num_experts) if e not in general]
    diverse = select(s_var, r - m, ctx.groups, among=cand) if r > m else []
    return Choice(s_var, sorted(general + diverse),
                  {"general": general, "m": m, "s_var": s_var.tolist(), "enu": enu_details})


@register("mop", needs_records=True, needs_weights=True, set_based=True,
          summary="Mosaic Pruning: general experts + one specialist per Spearman/Ward cluster of domain errors")
def mop(ctx: LayerContext, r: int) -> Choice:
    k_domains = r - split_general(r, ctx.params.get("general"), ctx.groups)
    n_rows = len(ctx.records.sample)
    with ThreadPoolExecutor(max_workers=1) as pool:  # K-Means' random numbers, drawn while stage 1 runs
        draws = pool.submit(seeding_draws, n_rows, k_domains, ctx.seed) if 0 < k_domains < n_rows else None
        m, general, enu_details, s_var, prods, sample = _stage1(ctx, r)
        draws = draws.result() if draws is not None else None
    n = ctx.num_experts
    details = {"general": general, "m": m, "s_var": s_var.tolist(), "enu": enu_details}
    if k_domains == 0:
        return Choice(s_var, sorted(general), details)
    # [N, H] float32: the products' copy on the device when they ran the experts (decoded from the same rows);
    # uploaded here when they came from the records (``recorded_products``: no x was needed for them)
    x = prods.runner.x if prods.runner is not None else sample.tensor("x", prods.logits.device)
    domains = kmeans(x, k_domains, seed=ctx.seed, draws=draws)  # [N] (Eq. 5)
    errors = prods.single_expert_errors(single_expert_weight(prods.spec, prods.logits))  # [N, E] ‖E_i(x)−z‖²
    counts = torch.bincount(domains, minlength=k_domains).double()  # [K]
    sums = torch.zeros(k_domains, n, dtype=torch.float64, device=errors.device).index_add_(0, domains, errors)
    perf = (sums / counts.clamp_min(1)[:, None]).T.cpu().numpy()  # [E, K] v_{i,k} (Eq. 6-7)

    size, per_group = n // ctx.groups, (r - m) // ctx.groups
    diverse, labels_out = [], {}
    for g in range(ctx.groups):
        cand = [e for e in range(g * size, (g + 1) * size) if e not in general]
        labels = spearman_ward(perf[cand], per_group)  # (Eq. 8-12)
        for c in range(per_group):
            members = [e for e, lab in zip(cand, labels) if lab == c]
            diverse.append(max(members, key=lambda e: (s_var[e], -e)))  # (Eq. 13)
        labels_out.update({str(e): int(lab) + g * per_group for e, lab in zip(cand, labels)})
    details.update({"domain_sizes": counts.long().tolist(), "performance": perf.tolist(), "clusters": labels_out,
                    "specialists": sorted(diverse)})
    return Choice(s_var, sorted(general + diverse), details)

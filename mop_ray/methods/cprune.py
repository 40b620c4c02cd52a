"""cprune: Cluster-driven Expert Pruning (Guo et al., arXiv 2504.07807) as its released code does the layer-wise stage.

Per calibration sequence the MoE input is mean-pooled (from the layer's token sample), every expert is run on
the pooled vectors, and for each batch of ``cprune_batch`` (32) sequences the experts — represented by their
concatenated outputs — are clustered with Ward linkage into ``cprune_clusters`` (12) clusters. Like the
released code, scipy's ``linkage`` is given the square distance matrix, so experts are clustered by their
vectors of distances to all experts. Within each cluster of s ≥ 3 experts the int(coef(s)·(1−p)·s) closest
to the centroid get a vote (all of them for s < 3). Uniform mode keeps the r most-voted experts per layer
(ties: closer to their centroids on average), so the output loads in stock engines.

``cprune-global`` is the released code's two-stage procedure: the layer-wise stage prunes the int(p_l·n)
least-voted experts of each layer (``cprune_rate`` p_l); the global stage clusters the survivors of ALL
layers together (same per-batch Ward voting, ``cprune_global_clusters`` C_g = 8 as in its script) and prunes
the least-voted globally, so layers keep different counts. The budget is the user's ``--keep R`` on average:
R × (MoE layers) experts in all. [INTERP] The released code prunes int(p_g·M) of the M survivors for a
chosen p_g; here p_g = 1 − R·L/M so the total matches ``--keep``. Each layer keeps at least what its router
needs (top-k; DeepSeek: a multiple of n_group with enough per group) and at least n − int(0.9·n) (the
released cap); with routing groups, counts move in steps of n_group, one per group, so every group stays
balanced. The output only loads with ``mop_ray.load_pruned``. Cost: the global stage holds every survivor's
outputs for one batch of ``cprune_batch`` sequences at a time ([M, batch·H] float32).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from mop_ray.arch.experts import expert_forward
from mop_ray.methods.base import Choice, LayerContext, register


def coef(s: int, n: int) -> float:
    """The released code's size-dependent keep coefficient, operator precedence exactly as written there."""
    x = s / n
    return 0.6 * (math.exp(0.5 - x) - math.exp(x - 0.5) / (math.exp(x - 0.5) + math.exp(0.5 - x))) + 0.5


def votes(outputs: np.ndarray, n_clusters: int, prune_rate: float, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Votes [n] and mean distance to the own centroid [n] for expert outputs [n, N, H] on N pooled sequences."""
    import warnings

    from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    n = outputs.shape[0]
    v = np.zeros(n)
    dist_sum = np.zeros(n)
    rounds = 0
    for start in range(0, outputs.shape[1], batch):
        emb = outputs[:, start:start + batch].reshape(n, -1)  # [n, B*H]
        with warnings.catch_warnings():  # the released code's quirk: a square matrix passed as observations
            warnings.simplefilter("ignore", ClusterWarning)
            labels = fcluster(linkage(squareform(pdist(emb)), "ward"), min(n_clusters, n), "maxclust")
        centroids = {c: emb[labels == c].mean(axis=0) for c in set(labels)}
        dist = np.linalg.norm(emb - np.stack([centroids[c] for c in labels]), axis=1)
        for c in set(labels):
            idx = np.where(labels == c)[0]
            s = len(idx)
            keep = idx if s < 3 else idx[np.argsort(dist[idx], kind="stable")][: int(coef(s, n) * (1 - prune_rate) * s)]
            v[keep] += 1
        dist_sum += dist
        rounds += 1
    return v, dist_sum / max(rounds, 1)


def pooled_outputs(ctx: LayerContext) -> tuple[np.ndarray, int]:
    """Every expert's output on the layer's mean-pooled sequence inputs, [n, B, H] float32, and B."""
    sample = ctx.records.sample
    moe, _ = ctx.moe_block()
    x = sample.tensor("x", ctx.device)  # [N, H] float32
    blocks = torch.as_tensor(sample.block.astype(np.int64), device=ctx.device)
    uniq, inv = torch.unique(blocks, return_inverse=True)
    pooled = torch.zeros(len(uniq), x.shape[1], device=ctx.device).index_add_(0, inv, x)
    pooled /= torch.bincount(inv, minlength=len(uniq))[:, None].float()  # [B, H] mean-pooled MoE inputs
    pooled = pooled.to(moe.experts.gate_up_proj.dtype)
    with torch.no_grad():
        outputs = torch.stack([expert_forward(moe.experts, pooled, e) for e in range(ctx.num_experts)])  # [n, B, H]
    return outputs.float().cpu().numpy(), len(uniq)


def vote_scores(v: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Votes first; being closer to the own centroid breaks ties."""
    return v - dist / (dist.max() + 1e-12) * 1e-3


@register("cprune", needs_records=True, needs_weights=True, set_based=True,
          summary="C-Prune layer-wise stage: per-batch Ward clustering of expert outputs, votes (uniform r)")
def cprune(ctx: LayerContext, r: int) -> Choice:
    outputs, sequences = pooled_outputs(ctx)
    v, dist = votes(outputs, int(ctx.params.get("cprune_clusters", 12)),
                    float(ctx.params.get("cprune_rate", 0.1)), int(ctx.params.get("cprune_batch", 32)))
    return Choice(vote_scores(v, dist), None, {"votes": v.tolist(), "mean_distance": dist.tolist(), "sequences": sequences})


class Stacked:
    """Several layers' survivor outputs [n_l, B, H] (memory-mapped .npy) seen as one [sum n_l, B, H] array."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.shape = (sum(a.shape[0] for a in arrays),) + arrays[0].shape[1:]

    def __getitem__(self, key) -> np.ndarray:  # only [:, batch slice] is used by ``votes``
        return np.concatenate([np.asarray(a[key]) for a in self.arrays])


def count_bounds(ckpt, layer: int, survivors: int) -> tuple[list[int], int]:
    """(valid per-layer counts between the floor and the survivors, step): router rules and the released cap."""
    from mop_ray.checkpoint.keepmap import check_r
    from mop_ray.errors import MopError

    n = ckpt.num_experts
    step = (ckpt.family.group_constraints(ckpt.config) or (1, 1))[0]
    valid = []
    for c in range(n - int(0.9 * n), survivors + 1):
        try:
            check_r(ckpt, c, allow_all=True)
        except MopError:
            continue
        valid.append(c)
    return valid, step


def allocate(scores: dict[int, np.ndarray], valid: dict[int, list[int]], step: int, total: int) -> dict[int, int]:
    """Per-layer counts summing to ``total``: each layer starts at its smallest valid count, then the layer whose
    next ``step`` experts have the highest mean global score grows, until the budget is spent."""
    from mop_ray.errors import MopError

    ordered = {l: np.sort(s)[::-1] for l, s in scores.items()}  # survivors' global scores, best first
    counts = {l: v[0] for l, v in valid.items() if v}
    if len(counts) != len(valid):
        bad = [l for l, v in valid.items() if not v]
        raise MopError(f"cprune-global: layers {bad} keep too few experts after the layer-wise stage for their router")
    lo, hi = sum(counts.values()), sum(v[-1] for v in valid.values())
    if not lo <= total <= hi:
        raise MopError(f"cprune-global: --keep asks for {total} experts in all, but the layers can keep "
                       f"between {lo} and {hi} after the layer-wise stage")
    while sum(counts.values()) < total:
        best, best_value = None, -np.inf
        for l, c in sorted(counts.items()):
            if c + step in valid[l]:
                value = float(ordered[l][c:c + step].mean())
                if value > best_value:
                    best, best_value = l, value
        counts[best] += step
    return counts


def global_stage(ckpt, choices: dict[int, Choice], r: int, params: dict) -> dict[int, list[int]]:
    """C-Prune's global stage over every layer's survivors -> kept ids per layer (counts differ)."""
    from mop_ray.methods.base import select

    layers = sorted(choices)
    survivors = {l: choices[l].kept for l in layers}
    stacked = Stacked([np.load(choices[l].details["outputs"], mmap_mode="r") for l in layers])
    total = r * len(layers)
    rate = max(0.0, 1.0 - total / stacked.shape[0])
    v, dist = votes(stacked, int(params.get("cprune_global_clusters", 8)), rate, int(params.get("cprune_batch", 32)))
    g = vote_scores(v, dist)
    offsets = np.cumsum([0] + [len(survivors[l]) for l in layers])
    scores = {l: g[offsets[j]:offsets[j + 1]] for j, l in enumerate(layers)}
    bounds = {l: count_bounds(ckpt, l, len(survivors[l])) for l in layers}
    step = bounds[layers[0]][1]
    counts = allocate(scores, {l: b[0] for l, b in bounds.items()}, step, total)
    kept = {}
    for j, l in enumerate(layers):
        layer_votes = np.asarray(choices[l].details["votes"], dtype=np.float64)
        final = -1e9 + layer_votes  # experts pruned by the layer-wise stage rank below every survivor
        final[survivors[l]] = scores[l]
        kept[l] = select(final, counts[l], step)
        choices[l].details.update({"global_votes": v[offsets[j]:offsets[j + 1]].tolist(), "count": counts[l]})
    return kept


@register("cprune-global", needs_records=True, needs_weights=True, combine=global_stage,
          summary="C-Prune as released: layer-wise votes, then global votes across layers (non-uniform counts)")
def cprune_layer_stage(ctx: LayerContext, r: int) -> Choice:
    outputs, sequences = pooled_outputs(ctx)
    rate = float(ctx.params.get("cprune_rate", 0.1))
    v, dist = votes(outputs, int(ctx.params.get("cprune_clusters", 12)), rate, int(ctx.params.get("cprune_batch", 32)))
    scores = vote_scores(v, dist)
    pruned = sorted(np.argsort(scores, kind="stable")[: int(rate * ctx.num_experts)].tolist())
    survivors = [e for e in range(ctx.num_experts) if e not in pruned]
    path = ctx.records.run_dir / "cprune" / f"layer_{ctx.layer:05d}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, outputs[survivors])  # [survivors, B, H], read by the global stage
    os.replace(tmp, path)
    return Choice(scores, survivors, {"votes": v.tolist(), "mean_distance": dist.tolist(), "sequences": sequences,
                                      "layer_pruned": pruned, "outputs": str(path)})

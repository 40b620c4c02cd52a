"""cprune: Cluster-driven Expert Pruning (Guo et al., arXiv 2504.07807) as its released code does the layer-wise stage.

Per calibration sequence the MoE input is mean-pooled (from the layer's token sample), every expert is run on
the pooled vectors, and for each batch of ``cprune_batch`` (32) sequences the experts — represented by their
concatenated outputs — are clustered with Ward linkage into ``cprune_clusters`` (12) clusters. Like the
released code, scipy's ``linkage`` is given the square distance matrix, so experts are clustered by their
vectors of distances to all experts. Within each cluster of s ≥ 3 experts the int(coef(s)·(1−p)·s) closest
to the centroid get a vote (all of them for s < 3). Uniform mode keeps the r most-voted experts per layer
(ties: closer to their centroids on average), so the output loads in stock engines. The paper's global
cross-layer stage, which yields different counts per layer, is not implemented yet.
"""

from __future__ import annotations

import math

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


@register("cprune", needs_records=True, needs_weights=True, set_based=True,
          summary="C-Prune layer-wise stage: per-batch Ward clustering of expert outputs, votes (uniform r)")
def cprune(ctx: LayerContext, r: int) -> Choice:
    sample = ctx.records.sample
    moe, _ = ctx.moe_block()
    x = torch.tensor(sample.x, device=ctx.device)
    blocks = torch.as_tensor(sample.block.astype(np.int64), device=ctx.device)
    uniq, inv = torch.unique(blocks, return_inverse=True)
    pooled = torch.zeros(len(uniq), x.shape[1], device=ctx.device).index_add_(0, inv, x)
    pooled /= torch.bincount(inv, minlength=len(uniq))[:, None].float()  # [B, H] mean-pooled MoE inputs
    pooled = pooled.to(moe.experts.gate_up_proj.dtype)
    with torch.no_grad():
        outputs = torch.stack([expert_forward(moe.experts, pooled, e) for e in range(ctx.num_experts)])  # [n, B, H]
    v, dist = votes(outputs.float().cpu().numpy(), int(ctx.params.get("cprune_clusters", 12)),
                    float(ctx.params.get("cprune_rate", 0.1)), int(ctx.params.get("cprune_batch", 32)))
    scores = v - dist / (dist.max() + 1e-12) * 1e-3  # votes first; closer to the centroid breaks ties
    return Choice(scores, None, {"votes": v.tolist(), "mean_distance": dist.tolist(), "sequences": len(uniq)})

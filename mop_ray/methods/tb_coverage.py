"""tb-coverage: Generic TB-Coverage (Zeng et al., arXiv 2607.01710) — a RECONSTRUCTION.

The paper's full text, code and numbers were not available; its abstract says per-expert utility is
profiled separately on each calibration corpus and a fixed-budget coverage rule protects high-utility
experts of every corpus before the final mask. This module implements the reading in the project's
research notes (algorithms.md §4):

1. utility u_c(e) per calibration source c (default: REAP saliency on that source's tokens;
   ``tb_utility`` = reap | frequency | ean);
2. protection budget P = ⌊λ·r⌋ (``tb_lambda``, default 0.5): round-robin over sources, each turn protecting
   that source's best not-yet-protected expert;
3. the remaining r − P slots go to the unprotected experts with the highest pooled utility, the mean over
   sources of u_c normalised to sum 1 in the layer.
With DeepSeek routing groups the same rule runs inside every group with budget r/groups.
"""

from __future__ import annotations

import numpy as np

from mop_ray.methods.base import Choice, LayerContext, register


def source_utility(stats, kind: str = "reap") -> np.ndarray:
    """[S, n] utility of every expert on every calibration source."""
    freq = stats.by_source["freq"]
    if kind == "frequency":
        return freq.copy()
    if kind == "ean":
        return stats.by_source["ean_sum"].copy()
    if kind == "reap":
        return np.divide(stats.by_source["reap_sum"], freq, out=np.zeros_like(freq), where=freq > 0)
    raise ValueError(f"tb_utility {kind!r}: expected reap, frequency or ean")


def coverage(utility: np.ndarray, budget: int, lam: float = 0.5, ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(protected, kept) among ``ids`` (default all) for utility [S, n] under ``budget`` kept experts."""
    ids = list(range(utility.shape[1])) if ids is None else list(ids)
    u = utility[:, ids]  # [S, c]
    ranks = [sorted(range(len(ids)), key=lambda j: (-u[s, j], j)) for s in range(u.shape[0])]
    protected: list[int] = []
    p = min(int(np.floor(lam * budget)), budget)
    turn = 0
    while len(protected) < p:
        s = turn % u.shape[0]
        turn += 1
        nxt = next((j for j in ranks[s] if j not in protected), None)
        if nxt is not None:
            protected.append(nxt)
    totals = u.sum(axis=1, keepdims=True)
    pooled = np.divide(u, totals, out=np.zeros_like(u), where=totals > 0).mean(axis=0)  # [c]
    rest = sorted((j for j in range(len(ids)) if j not in protected), key=lambda j: (-pooled[j], j))
    kept = protected + rest[: budget - len(protected)]
    return [ids[j] for j in protected], sorted(ids[j] for j in kept)


@register("tb-coverage", needs_records=True, set_based=True,
          summary="per-source utility, round-robin protection across sources, fill by pooled utility (reconstruction)")
def tb_coverage(ctx: LayerContext, r: int) -> Choice:
    stats = ctx.records.stats
    u = source_utility(stats, ctx.params.get("tb_utility", "reap"))
    lam = float(ctx.params.get("tb_lambda", 0.5))
    size, per = ctx.num_experts // ctx.groups, r // ctx.groups
    protected, kept = [], []
    for g in range(ctx.groups):
        p, k = coverage(u, per, lam, list(range(g * size, (g + 1) * size)))
        protected += p
        kept += k
    totals = u.sum(axis=1, keepdims=True)
    pooled = np.divide(u, totals, out=np.zeros_like(u), where=totals > 0).mean(axis=0)
    return Choice(pooled, sorted(kept), {"sources": stats.sources, "utility": u.tolist(), "protected": protected,
                                         "lambda": lam})

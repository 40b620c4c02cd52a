"""reap: Router-weighted Expert Activation Pruning (Lasby et al., arXiv 2510.13999).

S_j = (1/|X_j|) Σ_{x∈X_j} g_j(x)·‖f_j(x)‖₂ over the tokens X_j routed to j, with g the top-k gates
renormalised to sum to 1 (the reference code's default). Never-routed experts score 0.
"""

from __future__ import annotations

import numpy as np

from mop_ray.methods.base import LayerContext, register


@register("reap", needs_records=True, summary="router-weighted expert activation norm (REAP)")
def reap_scores(ctx: LayerContext) -> np.ndarray:
    stats = ctx.records.stats
    freq = stats.total("freq")
    return np.divide(stats.total("reap_sum"), freq, out=np.zeros_like(freq), where=freq > 0)  # [n] REAP Eq. S_j

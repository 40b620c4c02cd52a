"""ean: Expert Activation Norm, Σ_{x routed to j} ‖f_j(x)‖₂ (the EAN baseline of the REAP paper)."""

from __future__ import annotations

import numpy as np

from mop_ray.methods.base import LayerContext, register


@register("ean", needs_records=True, summary="summed output norm over routed tokens (EAN)")
def ean_scores(ctx: LayerContext) -> np.ndarray:
    return ctx.records.stats.total("ean_sum")  # [n]

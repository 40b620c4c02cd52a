"""frequency: keep the experts routed to most often (count of tokens whose top-k holds the expert)."""

from __future__ import annotations

import numpy as np

from mop_ray.methods.base import LayerContext, register


@register("frequency", needs_records=True, summary="most often routed-to experts (top-k counts)")
def frequency_scores(ctx: LayerContext) -> np.ndarray:
    return ctx.records.stats.total("freq")  # [n]

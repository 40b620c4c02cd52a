"""random: a uniformly random expert subset per layer, reproducible from (seed, layer). The floor baseline."""

from __future__ import annotations

import numpy as np

from mop_ray.methods.base import LayerContext, register


@register("random", needs_records=False, summary="uniformly random experts per layer (baseline)")
def random_scores(ctx: LayerContext) -> np.ndarray:
    return np.random.default_rng([ctx.seed, ctx.layer]).random(ctx.num_experts)  # [n]

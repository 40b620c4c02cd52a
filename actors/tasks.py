"""Ray tasks of the select phase: pure functions of files, safe to retry (the write phase's: ``actors.shard_writer``)."""

from __future__ import annotations

import ray

from mop_ray.methods import Choice, LayerContext, choose, get_method
from mop_ray.observe.records import LayerRecords


def select_layer(run_dir: str, ctx: LayerContext, method: str, r: int, block=None) -> tuple[int, list[int], list[float], dict]:
    """Kept ids, scores and method details of one MoE layer (a Ray task; GPU when the method uses weights).

    ``block``: the layer's MoE block already in memory (a stage actor's), used instead of loading it again.
    """
    import torch

    m = get_method(method)
    ctx.records = LayerRecords(run_dir, ctx.layer) if m.needs_records else None
    ctx.device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx.block = block
    try:
        with torch.no_grad():  # a stage's parameters require grad: no method should build autograd graphs on them
            kept, c = choose(m, ctx, r)
    finally:  # the caller may hold ``ctx`` on (a stage selects its layers in turn): let the sample and block go
        ctx.records = ctx.block = None
    return ctx.layer, kept, [float(s) for s in c.scores], c.details


def combine_layers(model_dir: str, method: str, results: list, r: int, params: dict) -> list:
    """A cross-layer method's global stage over every layer's ``select_layer`` result -> results with final ids."""
    from mop_ray.checkpoint.reader import Checkpoint

    choices = {layer: Choice(scores, kept, details) for layer, kept, scores, details in results}
    kept = get_method(method).combine(Checkpoint(model_dir), choices, r, params)
    return [(layer, kept[layer], c.scores, c.details) for layer, c in sorted(choices.items())]


select_layer_task = ray.remote(max_retries=3)(select_layer)
combine_layers_task = ray.remote(max_retries=3)(combine_layers)

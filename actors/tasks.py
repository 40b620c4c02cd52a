"""Ray tasks of the select and write phases: pure functions of files, safe to retry."""

from __future__ import annotations

from pathlib import Path

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
    kept, c = choose(m, ctx, r)
    return ctx.layer, kept, [float(s) for s in c.scores], c.details


def combine_layers(model_dir: str, method: str, results: list, r: int, params: dict) -> list:
    """A cross-layer method's global stage over every layer's ``select_layer`` result -> results with final ids."""
    from mop_ray.checkpoint.reader import Checkpoint

    choices = {layer: Choice(scores, kept, details) for layer, kept, scores, details in results}
    kept = get_method(method).combine(Checkpoint(model_dir), choices, r, params)
    return [(layer, kept[layer], c.scores, c.details) for layer, c in sorted(choices.items())]


def write_shard(directory: str, index: int, count: int, tensors) -> tuple[str, str]:
    import os

    from mop_ray.checkpoint.writer import write_one_shard

    fault = os.environ.get("MOP_RAY_FAULT_WRITE")  # test hook "<shard index>:<marker>": crash once mid-write
    if fault:
        shard, marker = fault.split(":", 1)
        if int(shard) == index and not os.path.exists(marker):
            open(marker, "w").close()
            (Path(directory) / f"model-{index + 1:05d}-of-{count:05d}.safetensors").write_bytes(b"partial")
            os._exit(1)

    return write_one_shard(Path(directory), index, count, tensors)


select_layer_task = ray.remote(max_retries=3)(select_layer)
combine_layers_task = ray.remote(max_retries=3)(combine_layers)
write_shard_task = ray.remote(max_retries=3)(write_shard)


def ray_shard_writer(num_cpus: float = 0.5, runtime_env: dict | None = None):
    """A ``shard_writer`` for ``write_pruned`` that writes every output shard as its own (retried) Ray task."""
    def write(directory: Path, plans):
        opts = {"num_cpus": num_cpus, **({"runtime_env": runtime_env} if runtime_env else {})}
        refs = [write_shard_task.options(**opts).remote(str(directory), i, n, tensors) for i, n, tensors in plans]
        return ray.get(refs)
    return write

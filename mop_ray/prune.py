"""Prune without calibration: a keep-map from a record-free method (``random``) or from the user's file.

Methods that need calibration records run through the Ray coordinator (``actors/coordinator.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mop_ray.checkpoint.keepmap import check_r
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.writer import WriteResult, write_pruned
from mop_ray.errors import MopError
from mop_ray.methods import LayerContext, choose, get_method


def layer_context(ckpt: Checkpoint, layer: int, seed: int, records=None, params=None, dtype: str | None = None) -> LayerContext:
    groups = ckpt.family.group_constraints(ckpt.config)
    return LayerContext(layer, ckpt.num_experts, ckpt.top_k, groups[0] if groups else 1, seed, records, params or {},
                        model_dir=str(ckpt.path), dtype=dtype)


def keep_map_from_method(ckpt: Checkpoint, method: str, r: int, seed: int = 0) -> tuple[dict[int, list[int]], dict]:
    """Kept ids and scores per MoE layer for a method that needs no calibration records."""
    m = get_method(method)
    if m.needs_records:
        raise MopError(f"--method {method}: needs calibration records; run it through the coordinator")
    check_r(ckpt, r)
    keep, scores = {}, {}
    for layer in ckpt.moe_layers:
        kept, c = choose(m, layer_context(ckpt, layer, seed), r)
        keep[layer] = kept
        scores[str(layer)] = [round(float(x), 6) for x in c.scores]
    return keep, scores


def read_keep_map_file(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MopError(f"--keep-map {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise MopError(f"--keep-map {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and "keep_map" in data:  # a pruning.json from an earlier run
        data = data["keep_map"]
    return data


def prune(model: str | Path, out: str | Path, *, method: str = "random", keep: int | None = None,
          seed: int = 0, keep_map_file: str | Path | None = None, overwrite: bool = False,
          max_shard_size: str = "5GB", allow_nonuniform: bool = False) -> WriteResult:
    t0 = time.time()
    ckpt = Checkpoint(model)
    if keep_map_file is not None:
        keep_map, scores, method_name, params = read_keep_map_file(keep_map_file), {}, "keep-map", {"file": str(keep_map_file)}
    else:
        if keep is None:
            raise MopError("prune: pass --keep R (experts to keep per layer) or --keep-map FILE.json")
        keep_map, scores = keep_map_from_method(ckpt, method, keep, seed)
        method_name, params = method, {"keep": keep, "seed": seed}
    select_s = time.time() - t0
    info = {"method": method_name, "parameters": params, "scores": scores, "timings": {"select_s": round(select_s, 3)}}
    return write_pruned(ckpt, out, keep_map, max_shard_size=max_shard_size, overwrite=overwrite, info=info,
                        allow_nonuniform=allow_nonuniform)

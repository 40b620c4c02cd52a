"""Validate an expert count r and a keep-map {layer: kept expert ids} against a checkpoint, before any write.

Rules (each failure is a one-line MopError naming what was expected and what was found):
- every MoE layer has an entry, no other layer does; ids are unique integers in [0, n);
- r is the same in every layer (stock transformers/vLLM configs hold one scalar count), top_k <= r < n —
  unless ``uniform=False`` (C-Prune's global stage): then each layer's count c obeys top_k <= c <= n;
- group-limited routing (DeepSeek, ``n_group`` > 1): r % n_group == 0, every group keeps the same number of
  experts, at least ``min_per_group`` (V3 scores a group by the sum of its top 2), and
  top_k <= topk_group * r / n_group so a token can still fill its k slots from its chosen groups.
"""

from __future__ import annotations

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError


def check_r(ckpt: Checkpoint, r: int, *, what: str | None = None, allow_all: bool = False) -> None:
    """Raise MopError unless keeping r experts in a layer is valid (``what`` names the setting in the message)."""
    n, k = ckpt.num_experts, ckpt.top_k
    what = what or f"--keep {r}"
    if ckpt.experts_per_layer:
        raise MopError(f"{ckpt.path}: already has different expert counts per layer (C-Prune global output); "
                       "pruning it again is not supported - prune the original model")
    if not isinstance(r, int) or isinstance(r, bool):
        raise MopError(f"--keep: expected an integer number of experts per layer, found {r!r}")
    if r > n or (r == n and not allow_all):
        raise MopError(f"{what}: must be below the {n} experts per layer of this {ckpt.family.name} model")
    if r < k:
        raise MopError(f"{what}: must be at least the router top-k num_experts_per_tok={k}")
    groups = ckpt.family.group_constraints(ckpt.config)
    if groups:
        n_group, min_per_group = groups
        topk_group = ckpt.family.router_spec(ckpt.config).topk_group
        if r % n_group:
            raise MopError(f"{what}: group-limited routing needs a multiple of n_group={n_group} experts")
        per = r // n_group
        if per < min_per_group:
            raise MopError(f"{what}: leaves {per} experts per group; {ckpt.family.name} routing needs >= {min_per_group}")
        if k > topk_group * per:
            raise MopError(
                f"{what}: top-k {k} exceeds topk_group*r/n_group = {topk_group}*{per}; tokens could not fill their slots"
            )


def normalise_keep_map(ckpt: Checkpoint, raw: dict, uniform: bool = True) -> dict[int, list[int]]:
    """Keys as ints, ids sorted; raise MopError on any rule above."""
    if not isinstance(raw, dict) or not raw:
        raise MopError(f"keep-map: expected a non-empty object {{layer: [expert ids]}}, found {type(raw).__name__}")
    n, moe = ckpt.num_experts, set(ckpt.moe_layers)
    keep: dict[int, list[int]] = {}
    for key, ids in raw.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise MopError(f"keep-map: layer key {key!r} is not an integer") from None
        if layer not in moe:
            raise MopError(f"keep-map: layer {layer} is not an MoE layer; MoE layers are {_ranges(sorted(moe))}")
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise MopError(f"keep-map: layer {layer}: expected a list of integer expert ids, found {ids!r}")
        if len(set(ids)) != len(ids):
            dup = sorted({e for e in ids if ids.count(e) > 1})
            raise MopError(f"keep-map: layer {layer}: duplicate expert ids {dup}")
        bad = [e for e in ids if not 0 <= e < n]
        if bad:
            raise MopError(f"keep-map: layer {layer}: expert ids {bad} out of range [0, {n})")
        keep[layer] = sorted(ids)
    missing = sorted(moe - set(keep))
    if missing:
        raise MopError(f"keep-map: no entry for MoE layers {_ranges(missing)}")
    sizes = {len(v) for v in keep.values()}
    if len(sizes) > 1 and uniform:
        raise MopError(
            f"keep-map: kept-expert counts differ across layers ({sorted(sizes)}); stock transformers/vLLM need one r "
            "(pass --allow-nonuniform to write a checkpoint that only mop_ray.load_pruned loads)"
        )
    if uniform:
        check_r(ckpt, sizes.pop())
    else:
        for layer, ids in sorted(keep.items()):
            check_r(ckpt, len(ids), what=f"keep-map: layer {layer} keeps {len(ids)}", allow_all=True)
    groups = ckpt.family.group_constraints(ckpt.config)
    if groups:
        n_group = groups[0]
        size = n // n_group
        for layer, ids in sorted(keep.items()):
            counts = [sum(1 for e in ids if e // size == g) for g in range(n_group)]
            if len(set(counts)) > 1:
                raise MopError(
                    f"keep-map: layer {layer} keeps {counts} experts in its {n_group} routing groups; "
                    f"group-limited routing needs the same number ({len(ids) // n_group}) in every group"
                )
    return keep


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)

"""The method registry, the per-layer context a method sees, and the shared score → kept-ids rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mop_ray.errors import MopError


@dataclass
class LayerContext:
    """What a method sees of one MoE layer.

    ``records`` (``mop_ray.observe.records.LayerRecords``) is set for methods that need calibration records;
    ``model_dir`` lets methods that recompute experts load this layer's weights (``moe_block``, in ``dtype``, as the
    stages computed); ``block`` is that MoE block when it is already in memory (a stage actor selecting for the
    layers it holds).
    """

    layer: int
    num_experts: int
    top_k: int
    groups: int = 1  # DeepSeek n_group when routing is group-limited, else 1
    seed: int = 0
    records: object | None = None
    params: dict = field(default_factory=dict)
    model_dir: str | None = None
    device: str = "cpu"
    block: object | None = None
    dtype: str | None = None  # the stages' compute dtype (--dtype); None: the checkpoint's

    def moe_block(self):
        """This layer's MoE block (router, experts, shared experts), eval mode: ``block``, else loaded from the
        checkpoint; with the checkpoint."""
        from mop_ray.arch.layer import build_layer, dtype_named
        from mop_ray.checkpoint.reader import Checkpoint

        ckpt = Checkpoint(self.model_dir)
        if self.block is not None:
            return self.block, ckpt
        return build_layer(ckpt, self.layer, device=self.device, dtype=dtype_named(self.dtype)).mlp, ckpt


@dataclass
class Choice:
    """A method's answer for one layer: per-expert scores (higher = keep) and, for set-based methods, the set."""

    scores: np.ndarray  # [n]
    kept: list[int] | None = None  # when None, the r best scores are kept (per routing group)
    details: dict = field(default_factory=dict)  # intermediates for pruning.json and the report


@dataclass(frozen=True)
class Method:
    name: str
    choose: Callable[[LayerContext, int], Choice]  # (ctx, r) -> Choice
    needs_records: bool
    needs_weights: bool
    summary: str
    # cross-layer stage (C-Prune global): (ckpt, {layer: Choice of the per-layer stage}, r, params) -> {layer: kept};
    # its per-layer stage returns candidate survivors, and the counts it keeps may differ per layer
    combine: Callable | None = None


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs_records: bool, summary: str, needs_weights: bool = False, set_based: bool = False,
             combine: Callable | None = None):
    """Register a method. Score methods are ``fn(ctx) -> scores [n]``; set-based ones ``fn(ctx, r) -> Choice``."""
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        choose = fn if set_based or combine else (lambda ctx, r, fn=fn: Choice(np.asarray(fn(ctx), dtype=np.float64)))
        _REGISTRY[name] = Method(name, choose, needs_records, needs_weights, summary, combine)
        return fn

    return wrap


def methods() -> dict[str, Method]:
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise MopError(f"--method {name!r}: unknown; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def select(scores: np.ndarray, r: int, groups: int = 1, among: list[int] | None = None) -> list[int]:
    """Ids of the r highest scores (ties to the lower id), r/groups from each contiguous routing group.

    ``among`` restricts the choice to those ids (each group must still hold r/groups of them).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if r % groups or n % groups:
        raise MopError(f"cannot keep {r} of {n} experts evenly across {groups} routing groups")
    size, per = n // groups, r // groups
    allowed = np.ones(n, dtype=bool) if among is None else np.isin(np.arange(n), among)
    kept: list[int] = []
    for g in range(groups):
        ids = [i for i in range(g * size, (g + 1) * size) if allowed[i]]
        if len(ids) < per:
            raise MopError(f"routing group {g} has {len(ids)} candidate experts; {per} needed")
        ids.sort(key=lambda i: (-scores[i], i))
        kept.extend(ids[:per])
    return sorted(kept)


def choose(method: Method, ctx: LayerContext, r: int) -> tuple[list[int], Choice]:
    """Run a method on one layer and return (kept ids, its Choice), checking the set it returns.

    For a cross-layer method this is its per-layer stage: the ids are the candidates its ``combine`` chooses from.
    """
    c = method.choose(ctx, r)
    if method.combine is not None:
        return sorted(c.kept), c
    kept = sorted(c.kept) if c.kept is not None else select(c.scores, r, ctx.groups)
    if len(kept) != r or len(set(kept)) != r or not all(0 <= e < ctx.num_experts for e in kept):
        raise MopError(f"method {method.name} returned {kept} for layer {ctx.layer}; expected {r} distinct ids")
    if ctx.groups > 1:
        size = ctx.num_experts // ctx.groups
        counts = [sum(1 for e in kept if e // size == g) for g in range(ctx.groups)]
        if len(set(counts)) > 1:
            raise MopError(f"method {method.name} kept {counts} experts per routing group in layer {ctx.layer}")
    return kept, c

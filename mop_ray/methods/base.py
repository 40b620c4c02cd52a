"""The method registry and the shared score → kept-ids rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mop_ray.errors import MopError


@dataclass
class LayerContext:
    """What a method sees of one MoE layer. ``records`` is filled by the observe phase for methods that need it."""

    layer: int
    num_experts: int
    top_k: int
    groups: int = 1  # DeepSeek n_group when routing is group-limited, else 1
    seed: int = 0
    records: object | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    score: Callable[[LayerContext], np.ndarray]  # -> [num_experts] float64, higher = more worth keeping
    needs_records: bool
    summary: str


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs_records: bool, summary: str):
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = Method(name, fn, needs_records, summary)
        return fn

    return wrap


def methods() -> dict[str, Method]:
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise MopError(f"--method {name!r}: unknown; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def select(scores: np.ndarray, r: int, groups: int = 1) -> list[int]:
    """Ids of the r highest scores (ties to the lower id), r/groups from each contiguous routing group."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if r % groups or n % groups:
        raise MopError(f"cannot keep {r} of {n} experts evenly across {groups} routing groups")
    size, per = n // groups, r // groups
    kept: list[int] = []
    for g in range(groups):
        block = scores[g * size:(g + 1) * size]
        order = np.lexsort((np.arange(size), -block))  # by score desc, then id asc
        kept.extend(int(g * size + i) for i in order[:per])
    return sorted(kept)

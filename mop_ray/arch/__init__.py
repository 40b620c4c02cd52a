"""Architecture adapters: the only place that knows a model family. One registry entry per family."""

from mop_ray.arch import families as _families  # noqa: F401  (fills the registry)
from mop_ray.arch.base import Family, detect, families, register
from mop_ray.arch.routing import RouterSpec, route

__all__ = ["Family", "RouterSpec", "detect", "families", "register", "route"]

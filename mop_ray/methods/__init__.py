"""Expert-selection methods, one module each, behind one registry.

A method scores the experts of one MoE layer (higher = keep) from a ``LayerContext``; ``select`` turns
scores into kept ids, honouring DeepSeek routing groups (the same count from every group). Methods that
need calibration records declare it, so the coordinator knows whether to run the observe phase.
"""

from mop_ray.methods.base import Choice, LayerContext, Method, choose, get_method, methods, register, select

from mop_ray.methods import cprune, ean, enu, frequency, mosaic, random, reap, tb_coverage  # noqa: F401,E402

__all__ = ["Choice", "LayerContext", "Method", "choose", "get_method", "methods", "register", "select"]

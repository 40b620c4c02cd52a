"""Checkpoints with a different number of experts per layer (C-Prune's global stage), marked so only
``mop_ray.load_pruned`` loads them.

Stock transformers and vLLM configs hold one scalar expert count, so a checkpoint whose layers keep
different counts cannot be described by a stock config. Writing the largest count would make stock
``from_pretrained`` fail on the smaller layers — unless the user passes ``ignore_mismatched_sizes=True``,
which silently re-initialises them. So the written ``config.json`` instead carries a ``model_type`` and
``architectures`` that no engine knows (stock loaders stop with "model type `mop-ray-nonuniform: …` not
recognised", naming the loader to use), the count key set to the largest per-layer count, and the original
identity plus the per-layer counts under ``mop_ray_nonuniform``::

    "model_type": "mop-ray-nonuniform: load with mop_ray.load_pruned()",
    "architectures": ["MopRayNonUniformExperts"],
    "mop_ray_nonuniform": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                           "experts_per_layer": {"0": 6, "1": 5, ...}}
"""

from __future__ import annotations

from mop_ray.errors import MopError

MARKER = "mop_ray_nonuniform"
MODEL_TYPE = "mop-ray-nonuniform: load with mop_ray.load_pruned()"
ARCHITECTURE = "MopRayNonUniformExperts"


def mark_config(config: dict, counts: dict[int, int]) -> dict:
    """A config (already patched to the largest count) marked as non-uniform with per-layer ``counts``."""
    out = dict(config)
    out[MARKER] = {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
                   "experts_per_layer": {str(k): int(v) for k, v in sorted(counts.items())}}
    out["model_type"] = MODEL_TYPE
    out["architectures"] = [ARCHITECTURE]
    return out


def unmark_config(config: dict) -> tuple[dict, dict[int, int] | None]:
    """(the config with its original model_type/architectures, per-layer counts) — counts None when uniform."""
    marker = config.get(MARKER)
    if marker is None:
        return config, None
    if not isinstance(marker, dict) or not isinstance(marker.get("experts_per_layer"), dict) or not marker.get("model_type"):
        raise MopError(f"config.json: {MARKER} must hold model_type, architectures and experts_per_layer; found {marker!r}")
    out = {k: v for k, v in config.items() if k != MARKER}
    out["model_type"] = marker["model_type"]
    out["architectures"] = marker.get("architectures")
    try:
        counts = {int(k): int(v) for k, v in marker["experts_per_layer"].items()}
    except (TypeError, ValueError):
        raise MopError(f"config.json: {MARKER}.experts_per_layer must map layer ids to counts; "
                       f"found {marker['experts_per_layer']!r}") from None
    return out, counts

"""The model zoo: tiny random checkpoints of every family (``tiny``), small trained MoEs shipped in the package,
and ``smol-moe`` (``smol``: SmolLM2-135M upcycled into a Mixtral), built on demand because it is too big to ship."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mop_ray.errors import MopError

SHIPPED = ("tiny-mixtral", "tiny-deepseek")


def shipped(name: str) -> Path:
    """Path of a trained zoo model shipped inside the package (see ``mop_ray/zoo/train.py`` for the recipe)."""
    if name == "smol-moe":
        raise MopError(f"zoo model {name!r} is built, not shipped (1.4 GB): python -m mop_ray.zoo.smol --out DIR; "
                       f"shipped models are {', '.join(SHIPPED)}")
    if name not in SHIPPED:
        raise MopError(f"zoo model {name!r}: unknown; shipped models are {', '.join(SHIPPED)}")
    path = Path(str(resources.files("mop_ray.zoo") / "models" / name))
    if not (path / "config.json").exists():
        raise MopError(f"zoo model {name!r} is missing from this installation ({path})")
    return path

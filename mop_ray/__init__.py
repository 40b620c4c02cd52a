"""mop-ray: remove whole experts from Mixture-of-Experts LLMs and write a smaller Hugging Face checkpoint."""

__version__ = "0.1.0"

from mop_ray.errors import MopError  # noqa: E402



def load_pruned(path, dtype=None, device="cpu", **kwargs):
    """Load a checkpoint mop-ray wrote, uniform or not (see ``mop_ray.load``)."""
    from mop_ray.load import load_pruned as _load

    return _load(path, dtype=dtype, device=device, **kwargs)


__all__ = ["MopError", "__version__", "load_pruned"]

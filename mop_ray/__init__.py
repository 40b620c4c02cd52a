"""mop-ray: remove whole experts from Mixture-of-Experts LLMs and write a smaller Hugging Face checkpoint."""

__version__ = "0.1.0"

from mop_ray.errors import MopError  # noqa: E402

__all__ = ["MopError", "__version__"]

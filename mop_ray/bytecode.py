"""A bytecode cache for installs that ship no ``.pyc`` files and cannot store them.

Python caches each module's compiled bytecode in ``__pycache__`` beside its source. An environment installed without
compiling (``uv`` by default, ``pip --no-compile``) into a directory the job cannot write, or run with
``PYTHONDONTWRITEBYTECODE=1`` (set by many container images), has no cache at all: every process compiles
transformers, torch, Ray and datasets from source again. On this project's CPU machine, forcing that
(``PYTHONDONTWRITEBYTECODE=1`` and an empty ``PYTHONPYCACHEPREFIX``) turned a stage's imports from 1.3 + 2.1 s
(torch and the stage's modules, then transformers' Mixtral layer) into 4.1 + 7.2–8.5 s, and the driver's
calibration imports from 0.5 into 1.7–2.0 s. On the H100 machines (PYTHONDONTWRITEBYTECODE=1, torch without
``.pyc``) the cache took a driver's and a stage's imports from 15–20 s to 7 s and the Mixtral benchmark job from
34.9 to 23.6–24.8 s (``benchmarks/RESULTS.md``, "Start-up with the bytecode cache, measured").

``use_bytecode_cache`` points Python at a writable cache directory (``sys.pycache_prefix``) in such an environment:
the first process compiles into it, every later one (the stages, the selection tasks, the next job) reads it.
Nothing is written beside the installed sources, which is what ``PYTHONDONTWRITEBYTECODE`` guards; the cache is
written despite it (``MOP_RAY_PYCACHE=0`` turns the cache off).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PROBES = ("transformers", "torch", "ray", "datasets")  # the packages whose imports dominate a process's start


def default_dir() -> Path:
    """``MOP_RAY_PYCACHE`` if set, else ``$XDG_CACHE_HOME/mop-ray/pycache`` (``~/.cache/mop-ray/pycache``)."""
    if os.environ.get("MOP_RAY_PYCACHE", "0") != "0":
        return Path(os.environ["MOP_RAY_PYCACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mop-ray" / "pycache"


def uncached(package: str) -> bool:
    """True when ``package`` is installed, its ``__init__`` has no compiled bytecode for this interpreter, and
    none will be written (its directory is read-only, or ``PYTHONDONTWRITEBYTECODE``): each import compiles it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return False
    pyc = Path(importlib.util.cache_from_source(origin))  # honours a pycache prefix already set
    if pyc.exists():
        return False
    home = pyc.parent if pyc.parent.exists() else pyc.parent.parent
    return sys.dont_write_bytecode or not os.access(home, os.W_OK)


def use_bytecode_cache(directory: str | os.PathLike | None = None, probes: tuple[str, ...] = PROBES) -> Path | None:
    """Cache bytecode under ``directory`` (default ``default_dir()``) when any of ``probes`` is uncached; for this
    process (``sys.pycache_prefix``, so call it before the heavy imports) and for the processes it starts
    (``PYTHONPYCACHEPREFIX``: a local Ray's workers inherit it; ``PYTHONDONTWRITEBYTECODE`` is lifted for both).
    -> the directory, or None when nothing was needed (compiled or writable installs, a prefix the user set,
    ``MOP_RAY_PYCACHE=0``) or it cannot be created."""
    if os.environ.get("MOP_RAY_PYCACHE") == "0" or sys.pycache_prefix is not None:
        return None
    if not any(uncached(p) for p in probes):
        return None
    path = Path(directory) if directory is not None else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    sys.pycache_prefix = str(path)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = str(path)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return path

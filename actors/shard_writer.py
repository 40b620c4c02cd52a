"""The write phase's Ray task: one output shard per task, a pure function of files, safe to retry.

Kept apart from ``actors.tasks`` on purpose: a Ray worker imports the module a task is defined in, and this one
imports no torch (seconds of start-up in every fresh writer process), only the byte-copying writer.
"""

from __future__ import annotations

from pathlib import Path

import ray


def write_shard(directory: str, index: int, count: int, tensors) -> tuple[str, str]:
    import os

    from mop_ray.checkpoint.writer import write_one_shard

    fault = os.environ.get("MOP_RAY_FAULT_WRITE")  # test hook "<shard index>:<marker>": crash once mid-write
    if fault:
        shard, marker = fault.split(":", 1)
        if int(shard) == index and not os.path.exists(marker):
            open(marker, "w").close()
            (Path(directory) / f"model-{index + 1:05d}-of-{count:05d}.safetensors").write_bytes(b"partial")
            os._exit(1)

    return write_one_shard(Path(directory), index, count, tensors)


write_shard_task = ray.remote(max_retries=3)(write_shard)


def _task(num_cpus: float, runtime_env: dict | None):
    return write_shard_task.options(num_cpus=num_cpus, **({"runtime_env": runtime_env} if runtime_env else {}))


def ray_shard_submit(num_cpus: float = 0.5, runtime_env: dict | None = None):
    """A ``submit`` for ``ShardsAhead``: one output shard as its own (retried) Ray task -> a concurrent Future."""
    task = _task(num_cpus, runtime_env)

    def submit(directory: Path, index: int, count: int, tensors):
        return task.remote(str(directory), index, count, tensors).future()
    return submit


def ray_shard_writer(num_cpus: float = 0.5, runtime_env: dict | None = None):
    """A ``shard_writer`` for ``write_pruned`` that writes every output shard as its own (retried) Ray task."""
    task = _task(num_cpus, runtime_env)

    def write(directory: Path, plans):
        return ray.get([task.remote(str(directory), i, n, tensors) for i, n, tensors in plans])
    return write

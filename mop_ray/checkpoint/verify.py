"""`mop-ray verify DIR`: re-check a written checkpoint without loading it.

Checks that the index and the shard headers agree (every indexed tensor is in its shard, no shard holds
unindexed tensors, ``total_size`` matches), that every shard's sha256 equals the one ``pruning.json``
recorded when it was written, and that the layout is consistent (one router row per expert in the
config's count, complete expert sets) by opening it as a ``Checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mop_ray.checkpoint.reader import INDEX_NAME, Checkpoint
from mop_ray.checkpoint.safetensors_io import file_sha256, read_header
from mop_ray.errors import MopError


def verify(path: str | Path) -> dict:
    path = Path(path)
    ckpt = Checkpoint(path)  # config, family, index, headers, router rows, expert sets
    index = json.loads((path / INDEX_NAME).read_text()) if (path / INDEX_NAME).exists() else None
    shards = sorted(set(ckpt.weight_map.values()))
    for shard in shards:
        header, _ = read_header(path / shard)
        extra = set(header) - {n for n, s in ckpt.weight_map.items() if s == shard}
        if extra:
            raise MopError(f"{path / shard}: holds tensors the index does not list: {sorted(extra)[:3]}")
    if index is not None:
        declared = index.get("metadata", {}).get("total_size")
        if declared is not None and declared != ckpt.total_bytes:
            raise MopError(f"{path / INDEX_NAME}: total_size {declared} but the shards hold {ckpt.total_bytes} bytes")
    checked = 0
    pruning = path / "pruning.json"
    if pruning.exists():
        recorded = json.loads(pruning.read_text()).get("shards", {})
        for name, entry in recorded.items():
            if not (path / name).exists():
                raise MopError(f"{path}: shard {name} recorded in pruning.json is missing")
            if file_sha256(path / name) != entry["sha256"]:
                raise MopError(f"{path / name}: sha256 differs from pruning.json (the file changed after writing)")
            checked += 1
    return {"family": ckpt.family.name, "experts": ckpt.num_experts, "shards": len(shards), "checksums": checked,
            "bytes": ckpt.total_bytes}

"""Open a Hugging Face model directory lazily: config, family, and every tensor's location, no tensor data.

Only safetensors are read. Pickle-based weights (``.bin``/``.pt``) are refused, never unpickled: loading
them can run arbitrary code, and they do not support reading one tensor without loading a whole file.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from functools import cached_property
from pathlib import Path

from mop_ray.arch import Family, detect
from mop_ray.checkpoint.nonuniform import unmark_config
from mop_ray.checkpoint.safetensors_io import TensorInfo, read_header
from mop_ray.errors import MopError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def load_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MopError(f"{path.parent}: no {path.name} ({what})") from None
    except json.JSONDecodeError as e:
        raise MopError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise MopError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class ModelFacts:
    """Expert count, top-k, layers and MoE layers, read through the family from ``self.config``."""

    family: Family
    config: dict
    experts_per_layer: dict[int, int] | None = None  # set only for non-uniform checkpoints (C-Prune global)

    @property
    def num_experts(self) -> int:
        """The config's routed-expert count (the largest per-layer count in a non-uniform checkpoint)."""
        return self.family.num_experts(self.config)

    def experts_in(self, layer: int) -> int:
        """Routed experts in MoE layer ``layer``."""
        return self.experts_per_layer[layer] if self.experts_per_layer else self.num_experts

    @property
    def top_k(self) -> int:
        return self.family.top_k(self.config)

    @property
    def num_layers(self) -> int:
        return self.family.num_layers(self.config)

    @cached_property
    def moe_layers(self) -> list[int]:
        return self.family.moe_layers(self.config)


class Checkpoint(ModelFacts):
    """A model directory: ``config.json`` + safetensors (sharded with an index, or a single file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MopError(f"--model {self.path}: expected a model directory, found {'a file' if self.path.exists() else 'nothing'}")
        self.config, self.experts_per_layer = unmark_config(load_json(self.path / "config.json", "the model config"))
        self.family: Family = detect(self.config)
        self.weight_map: dict[str, str] = self._weight_map()
        self.tensors: dict[str, TensorInfo] = self._headers()
        self._check_layout()

    # --- discovery ----------------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.exists():
            wm = load_json(index, "the shard index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise MopError(f"{index}: expected a non-empty 'weight_map' object")
            return dict(wm)
        if (self.path / SINGLE_NAME).exists():
            tensors, _ = read_header(self.path / SINGLE_NAME)
            return {name: SINGLE_NAME for name in tensors}
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise MopError(
                f"{self.path}: weights are pickle files ({', '.join(pickles[:3])}); mop-ray reads safetensors only and "
                "never unpickles - convert them first (e.g. transformers save_pretrained(safe_serialization=True))"
            )
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        found = f"safetensors files without an index: {', '.join(shards[:3])}" if shards else "no weight files"
        raise MopError(f"{self.path}: expected {INDEX_NAME} or {SINGLE_NAME}, found {found}")

    def _headers(self) -> dict[str, TensorInfo]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, shard in self.weight_map.items():
            by_file[shard].append(name)
        tensors: dict[str, TensorInfo] = {}
        for shard, names in sorted(by_file.items()):
            path = self.path / shard
            if not path.exists():
                raise MopError(f"{self.path}: shard {shard} is listed in {INDEX_NAME} ({len(names)} tensors) but missing")
            header, _ = read_header(path)
            for name in names:
                if name not in header:
                    raise MopError(f"{path}: {INDEX_NAME} places tensor {name!r} in this shard but its header lacks it")
                tensors[name] = header[name]
        return tensors

    def _check_layout(self) -> None:
        fam, cfg = self.family, self.config
        expected = set(fam.moe_layers(cfg))
        found = {int(m.group(1)) for n in self.tensors if (m := fam.router_re.match(n)) and m.group(2) == "weight"}
        found -= set(fam.mtp_layers(cfg))
        if found != expected:
            raise MopError(
                f"{self.path}: config.json says MoE layers {sorted(expected)} but the weights have routers in layers "
                f"{sorted(found)} (expected on-disk names like {fam.router_weight_name(min(expected or {0}))!r})"
            )
        if self.experts_per_layer is not None and set(self.experts_per_layer) != expected:
            raise MopError(f"{self.path}: config.json lists per-layer expert counts for layers "
                           f"{sorted(self.experts_per_layer)} but the MoE layers are {sorted(expected)}")
        experts: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for name in self.tensors:
            if m := fam.expert_re.match(name):
                experts[int(m.group(1))][int(m.group(2))].add(m.group(3))
        for i in sorted(found):
            n = self.experts_in(i)
            rows = self.tensors[fam.router_weight_name(i)].shape[0]
            if rows != n:
                raise MopError(f"{self.path}: layer {i} router has {rows} rows but config.json says {n} experts")
            if per := experts.get(i):
                extra = sorted(e for e in per if e >= n)
                if extra:
                    raise MopError(f"{self.path}: layer {i} has tensors for experts {extra[:3]} beyond its {n} experts")
            if i in experts:  # per-expert layout: every expert has the same tensors (weights, fp8 scales)
                per = experts[i]
                ref = per.get(0, set())
                if not ref:
                    raise MopError(f"{self.path}: layer {i} has no tensors for expert 0")
                bad = [e for e in range(n) if per.get(e, set()) != ref]
                if bad:
                    e = bad[0]
                    raise MopError(f"{self.path}: layer {i} expert {e} has tensors {sorted(per.get(e, set()))}, "
                                   f"expected {sorted(ref)} like expert 0")
            elif not any(fam.fused_expert_re.match(nm) for nm in self.layer_tensors(i)):
                raise MopError(f"{self.path}: layer {i} has a router but no expert tensors")

    # --- facts --------------------------------------------------------------------------------------------
    @cached_property
    def mtp_layers(self) -> list[int]:
        return [i for i in self.family.mtp_layers(self.config) if any(n.startswith(f"model.layers.{i}.") for n in self.tensors)]

    def layer_of(self, name: str) -> int | None:
        m = LAYER_RE.match(name)
        return int(m.group(1)) if m else None

    @cached_property
    def layer_bytes(self) -> dict[int, int]:
        sizes: dict[int, int] = defaultdict(int)
        for name, t in self.tensors.items():
            layer = self.layer_of(name)
            if layer is not None:
                sizes[layer] += t.nbytes
        return dict(sizes)

    @cached_property
    def resident_layer_bytes(self) -> dict[int, int]:
        """Bytes of each layer once loaded for calibration: FP8 weights dequantized to 2 bytes, scales consumed."""
        sizes: dict[int, int] = defaultdict(int)
        for name, t in self.tensors.items():
            layer = self.layer_of(name)
            if layer is None or name.endswith("weight_scale_inv"):
                continue
            sizes[layer] += t.nbytes * 2 // t.itemsize if t.dtype.startswith("F8") else t.nbytes
        return dict(sizes)

    @cached_property
    def embed_bytes(self) -> int:
        """Bytes of the token embedding (the first stage holds it; the LM head belongs to no stage)."""
        return sum(t.nbytes for n, t in self.tensors.items() if "embed_tokens" in n and self.layer_of(n) is None)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def layer_tensors(self, i: int) -> dict[str, TensorInfo]:
        prefix = self.family.layer_prefix(i)
        return {n: t for n, t in self.tensors.items() if n.startswith(prefix)}

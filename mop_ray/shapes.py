"""Sizes of a model from its config.json alone (``mop-ray plan --shape-only``): plan a cluster before downloading.

Every decoder layer is built on the ``meta`` device from the family's transformers class, so its parameter
shapes are exact for that config; bytes use the config's dtype, or one byte per routed-expert weight plus
its 128×128-block float32 scales when the config declares FP8 quantisation (DeepSeek-V3's release).
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path

from mop_ray.arch import detect
from mop_ray.checkpoint.reader import ModelFacts
from mop_ray.errors import MopError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


class ShapeOnly(ModelFacts):
    """The subset of ``Checkpoint`` the stage planner uses, computed from a config.json file or directory."""

    def __init__(self, config: str | Path):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        try:
            self.config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MopError(f"--shape-only {path}: cannot read a config.json ({e.__class__.__name__})") from None
        self.path = path.parent
        self.family = detect(self.config)
        dtype = str(self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16")
        self.dtype_bytes = DTYPE_BYTES.get(dtype, 2)
        quant = self.config.get("quantization_config") or {}
        self.fp8 = quant.get("quant_method") == "fp8"
        self.block = tuple(quant.get("weight_block_size") or (128, 128))
        self.tensors: dict = {}  # no weights: the planner adds the embedding itself via embed_bytes

    @cached_property
    def embed_bytes(self) -> int:
        return int(self.config["vocab_size"]) * int(self.config["hidden_size"]) * self.dtype_bytes

    def _layer_bytes(self, i: int, resident: bool = False) -> int:
        """On-disk bytes of layer i; ``resident``: once loaded, FP8 experts dequantized to 2 bytes, no scales."""
        import torch
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(self.config["model_type"], **{k: v for k, v in self.config.items() if k != "model_type"})
        cls = getattr(self.family.modeling(), self.family.decoder_layer_class)
        with torch.device("meta"):
            layer = cls(cfg, layer_idx=i)
        params = dict(layer.named_parameters())
        total = sum(b.numel() * b.element_size() for n, b in layer.state_dict().items() if n not in params)  # e.g. fp32 biases
        for name, p in params.items():
            if self.fp8 and resident and name.startswith("mlp.experts."):
                total += p.numel() * 2
            elif self.fp8 and name.startswith("mlp.experts."):  # [E, out, in] weights in fp8 + fp32 block scales
                out_dim, in_dim = p.shape[-2], p.shape[-1]
                scales = math.ceil(out_dim / self.block[0]) * math.ceil(in_dim / self.block[1])
                total += p.numel() + p.shape[0] * scales * 4
            else:
                total += p.numel() * self.dtype_bytes
        return total

    def _per_layer(self, resident: bool) -> dict[int, int]:
        moe = set(self.moe_layers)
        cache: dict[bool, int] = {}
        out = {}
        for i in range(self.num_layers):  # every MoE layer has the same shapes, as does every dense one
            kind = i in moe
            if kind not in cache:
                cache[kind] = self._layer_bytes(i, resident)
            out[i] = cache[kind]
        return out

    @cached_property
    def layer_bytes(self) -> dict[int, int]:
        return self._per_layer(False)

    @cached_property
    def resident_layer_bytes(self) -> dict[int, int]:
        return self._per_layer(True)

    @property
    def total_bytes(self) -> int:
        heads = 1 if self.config.get("tie_word_embeddings") else 2
        return sum(self.layer_bytes.values()) + heads * self.embed_bytes

"""What an architecture adapter knows about one MoE family, straight from ``config.json`` and tensor names.

A family is data plus a few small rules: where routed experts, the router and shared experts live on disk,
which config keys hold the expert count and top-k, which layers are MoE, which layers are DeepSeek MTP
layers, and how the router turns logits into routing weights (``router_spec``). Layer building for
calibration lives in ``mop_ray.arch.layer``; checkpoint rewriting in ``mop_ray.checkpoint``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from mop_ray.arch.routing import RouterSpec
from mop_ray.errors import MopError


@dataclass(frozen=True)
class Family:
    """One MoE model family. Subclasses set the class attributes and override the rules that differ."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    count_keys: tuple[str, ...] = ()  # config keys for the routed-expert count; the first is canonical
    moe_module: str = "mlp"  # on-disk module of the MoE block under model.layers.{i}.
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # (gate, up, down) on disk
    shared_modules: tuple[str, ...] = ()  # shared experts and their gates, under the MoE module
    modeling_module: str = ""  # transformers.models.<x>.modeling_<x>
    decoder_layer_class: str = ""
    rotary_class: str = ""
    norm_class: str = ""

    # --- config -------------------------------------------------------------------------------------------
    def num_experts(self, cfg: dict) -> int:
        for key in self.count_keys:
            if cfg.get(key) is not None:
                return int(cfg[key])
        raise MopError(f"config.json of a {self.name} model has none of {list(self.count_keys)} (the expert count)")

    def top_k(self, cfg: dict) -> int:
        if cfg.get("num_experts_per_tok") is None:
            raise MopError(f"config.json of a {self.name} model lacks num_experts_per_tok (the router top-k)")
        return int(cfg["num_experts_per_tok"])

    def num_layers(self, cfg: dict) -> int:
        return int(cfg["num_hidden_layers"])

    def is_moe_layer(self, cfg: dict, i: int) -> bool:
        return True

    def moe_layers(self, cfg: dict) -> list[int]:
        return [i for i in range(self.num_layers(cfg)) if self.is_moe_layer(cfg, i)]

    def mtp_layers(self, cfg: dict) -> list[int]:
        """Multi-token-prediction layers stored after the decoder layers (DeepSeek-V3); none elsewhere."""
        return []

    def router_spec(self, cfg: dict) -> RouterSpec:
        return RouterSpec(top_k=self.top_k(cfg), norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))

    def shared_output(self, moe, x):
        """The shared-expert term the MoE block adds to its routed output, [T, H]; None when there is none."""
        return None

    def group_constraints(self, cfg: dict) -> tuple[int, int] | None:
        """(n_group, min experts per group) when routing is group-limited, else None."""
        spec = self.router_spec(cfg)
        if spec.group_score is None or spec.n_group <= 1:
            return None
        return spec.n_group, spec.min_per_group

    def patch_config(self, cfg: dict, r: int) -> dict:
        """The ORIGINAL config dict with the expert count set to r; every other key kept as it was."""
        out = dict(cfg)
        present = [k for k in self.count_keys if k in out]
        for key in present or self.count_keys[:1]:
            out[key] = r
        return out

    # --- on-disk names ------------------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    @property
    def expert_re(self) -> re.Pattern:
        """``model.layers.{L}.<moe>.experts.{e}.<rest>`` (per-expert tensors, incl. fp8 ``weight_scale_inv``)."""
        return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(self.moe_module)}\.experts\.(\d+)\.(.+)$")

    @property
    def fused_expert_re(self) -> re.Pattern:
        """Fused on-disk experts (``save_pretrained(save_original_format=False)``): sliced along dim 0."""
        return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(self.moe_module)}\.experts\.(gate_up_proj|down_proj)(_bias)?$")

    @property
    def router_re(self) -> re.Pattern:
        """Router tensors whose first dim is the expert count: weight, bias, e_score_correction_bias."""
        return re.compile(rf"^model\.layers\.(\d+)\.{re.escape(self.moe_module)}\.gate\.(weight|bias|e_score_correction_bias)$")

    def router_weight_name(self, i: int) -> str:
        return f"model.layers.{i}.{self.moe_module}.gate.weight"

    # --- transformers classes -------------------------------------------------------------------------------
    def modeling(self):
        return importlib.import_module(self.modeling_module)

    def config_class(self):
        from transformers import AutoConfig  # noqa: F401  (registers every family)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_types[0]]


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"family {family.name!r} registered twice")
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_REGISTRY)


def detect(cfg: dict) -> Family:
    """The family of a config.json dict, by ``model_type`` then ``architectures``; a clear error otherwise."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for fam in _REGISTRY.values():
        if model_type in fam.model_types:
            return fam
    for fam in _REGISTRY.values():
        if any(a in fam.architectures for a in archs):
            return fam
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in _REGISTRY.values())
    remote = (" - its config.json asks for repository code (auto_map), which mop-ray never imports or runs"
              if cfg.get("auto_map") else "")
    raise MopError(
        f"unsupported model family: model_type={model_type!r}, architectures={archs}; supported: {supported}{remote}"
    )

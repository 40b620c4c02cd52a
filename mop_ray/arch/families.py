"""The six supported families: Mixtral, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE, DeepSeek-V2, DeepSeek-V3, OLMoE.

Sources: transformers 5.x ``models/<family>/{configuration,modeling}_<family>.py`` and
``conversion_mapping.py`` (on-disk names), checked on tiny random models in tests/test_arch.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from mop_ray.arch.base import Family, register
from mop_ray.arch.routing import RouterSpec


@dataclass(frozen=True)
class SoftmaxTopK(Family):
    """Softmax over all experts, top-k, renormalise if ``norm_topk_prob`` (Mixtral always renormalises)."""

    always_renormalise: bool = False

    def router_spec(self, cfg: dict) -> RouterSpec:
        renorm = self.always_renormalise or bool(cfg.get("norm_topk_prob", False))
        return RouterSpec(top_k=self.top_k(cfg), scoring="softmax", norm_topk_prob=renorm)


@dataclass(frozen=True)
class QwenMoe(SoftmaxTopK):
    """Qwen2-MoE / Qwen3-MoE: MoE where ``(i+1) % decoder_sparse_step == 0`` and i not in ``mlp_only_layers``."""

    def is_moe_layer(self, cfg: dict, i: int) -> bool:
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        return i not in (cfg.get("mlp_only_layers") or []) and self.num_experts(cfg) > 0 and (i + 1) % step == 0

    def shared_output(self, moe, x):
        if not hasattr(moe, "shared_expert"):  # Qwen3-MoE has none
            return None
        import torch

        return torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)  # Qwen2-MoE: gated shared expert


@dataclass(frozen=True)
class DeepSeek(Family):
    """DeepSeek-V2/V3: dense first ``first_k_dense_replace`` layers, group-limited routing, shared experts."""

    def is_moe_layer(self, cfg: dict, i: int) -> bool:
        dense_first = int(cfg.get("first_k_dense_replace", 0) or 0)
        freq = int(cfg.get("moe_layer_freq", 1) or 1)  # official remote-code configs; 1 in every release
        return i >= dense_first and i % freq == 0

    def shared_output(self, moe, x):
        return moe.shared_experts(x) if getattr(moe, "shared_experts", None) is not None else None


@dataclass(frozen=True)
class DeepSeekV2(DeepSeek):
    def router_spec(self, cfg: dict) -> RouterSpec:
        grouped = cfg.get("topk_method", "greedy") == "group_limited_greedy"
        return RouterSpec(
            top_k=self.top_k(cfg),
            scoring="softmax",
            norm_topk_prob=False,  # transformers' DeepseekV2TopkRouter never renormalises
            n_group=int(cfg.get("n_group") or 1) if grouped else 1,
            topk_group=int(cfg.get("topk_group") or 1) if grouped else 1,
            group_score="max" if grouped else None,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0) or 1.0),
        )


@dataclass(frozen=True)
class DeepSeekV3(DeepSeek):
    def mtp_layers(self, cfg: dict) -> list[int]:
        n = self.num_layers(cfg)
        return list(range(n, n + int(cfg.get("num_nextn_predict_layers", 0) or 0)))

    def router_spec(self, cfg: dict) -> RouterSpec:
        return RouterSpec(
            top_k=self.top_k(cfg),
            scoring="sigmoid",
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            group_score="top2_sum",
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0) or 1.0),
            has_correction_bias=True,
        )

    def patch_config(self, cfg: dict, r: int) -> dict:
        out = super().patch_config(cfg, r)
        if out.get("num_nextn_predict_layers"):
            out["num_nextn_predict_layers"] = 0  # MTP layers are dropped (README: "DeepSeek MTP layers")
        return out


MIXTRAL = register(SoftmaxTopK(
    name="mixtral", model_types=("mixtral",), architectures=("MixtralForCausalLM",),
    count_keys=("num_local_experts", "num_experts"), moe_module="block_sparse_moe", expert_projs=("w1", "w3", "w2"),
    modeling_module="transformers.models.mixtral.modeling_mixtral", decoder_layer_class="MixtralDecoderLayer",
    rotary_class="MixtralRotaryEmbedding", norm_class="MixtralRMSNorm", always_renormalise=True,
))
QWEN2_MOE = register(QwenMoe(
    name="qwen2_moe", model_types=("qwen2_moe",), architectures=("Qwen2MoeForCausalLM",),
    count_keys=("num_experts", "num_local_experts"), shared_modules=("shared_expert", "shared_expert_gate"),
    modeling_module="transformers.models.qwen2_moe.modeling_qwen2_moe", decoder_layer_class="Qwen2MoeDecoderLayer",
    rotary_class="Qwen2MoeRotaryEmbedding", norm_class="Qwen2MoeRMSNorm",
))
QWEN3_MOE = register(QwenMoe(
    name="qwen3_moe", model_types=("qwen3_moe",), architectures=("Qwen3MoeForCausalLM",),
    count_keys=("num_experts", "num_local_experts"),
    modeling_module="transformers.models.qwen3_moe.modeling_qwen3_moe", decoder_layer_class="Qwen3MoeDecoderLayer",
    rotary_class="Qwen3MoeRotaryEmbedding", norm_class="Qwen3MoeRMSNorm",
))
DEEPSEEK_V2 = register(DeepSeekV2(
    name="deepseek_v2", model_types=("deepseek_v2",), architectures=("DeepseekV2ForCausalLM",),
    count_keys=("n_routed_experts", "num_experts"), shared_modules=("shared_experts",),
    modeling_module="transformers.models.deepseek_v2.modeling_deepseek_v2",
    decoder_layer_class="DeepseekV2DecoderLayer", rotary_class="DeepseekV2RotaryEmbedding",
    norm_class="DeepseekV2RMSNorm",
))
DEEPSEEK_V3 = register(DeepSeekV3(
    name="deepseek_v3", model_types=("deepseek_v3",), architectures=("DeepseekV3ForCausalLM",),
    count_keys=("n_routed_experts", "num_local_experts"), shared_modules=("shared_experts",),
    modeling_module="transformers.models.deepseek_v3.modeling_deepseek_v3",
    decoder_layer_class="DeepseekV3DecoderLayer", rotary_class="DeepseekV3RotaryEmbedding",
    norm_class="DeepseekV3RMSNorm",
))
OLMOE = register(SoftmaxTopK(
    name="olmoe", model_types=("olmoe",), architectures=("OlmoeForCausalLM",),
    count_keys=("num_experts", "num_local_experts"),
    modeling_module="transformers.models.olmoe.modeling_olmoe", decoder_layer_class="OlmoeDecoderLayer",
    rotary_class="OlmoeRotaryEmbedding", norm_class="OlmoeRMSNorm",
))

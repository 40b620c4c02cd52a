"""Router functions of the supported families, written once from their modeling code.

``route(spec, logits)`` returns the per-token top-k expert ids and the gate weights the MoE block multiplies
expert outputs by, exactly as the family's router module does. ``keep`` simulates pruning: dropped experts
can never be chosen, and for softmax routers their probability mass is removed before normalisation, which
equals the physically pruned router (softmax over the kept rows). This is how methods score candidate sets
without rebuilding a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so the checkpoint writer stays light
    import torch


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to turn router logits into routing decisions for one family and config."""

    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True  # renormalise the chosen k weights to sum to 1
    n_group: int = 1  # group-limited routing (DeepSeek): experts split into n_group contiguous groups
    topk_group: int = 1  # groups a token may route into
    group_score: str | None = None  # "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3) | None
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (choice only, not weights)

    @property
    def min_per_group(self) -> int:
        """Experts each group must keep so the group score stays defined (V3 sums each group's top 2)."""
        return 2 if self.group_score == "top2_sum" else 1


def route(
    spec: RouterSpec,
    logits: torch.Tensor,  # [T, E] float32 router logits
    correction_bias: torch.Tensor | None = None,  # [E]
    keep: torch.Tensor | None = None,  # [E] or per token [T, E] bool, experts that survive pruning
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids [T, k] and gate weights [T, k] (float32), matching the family's router module."""
    import torch

    logits = logits.float()
    n_experts = logits.shape[-1]
    if spec.scoring == "softmax":
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        scores = logits.softmax(dim=-1)  # [T, E]
        choice = scores
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
    elif spec.scoring == "sigmoid":
        scores = logits.sigmoid()  # [T, E]
        choice = scores + correction_bias if correction_bias is not None else scores
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
    else:
        raise ValueError(f"unknown router scoring {spec.scoring!r}; expected 'softmax' or 'sigmoid'")

    if spec.group_score is not None and spec.n_group > 1:
        grouped = choice.view(-1, spec.n_group, n_experts // spec.n_group)  # [T, G, E/G]
        if spec.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, n_experts)
        # V2 zeroes the scores of unchosen groups, V3 sets them to -inf; with k <= experts in chosen groups
        # both choose the same experts, and -inf also keeps pruned (-inf) experts out.
        fill = 0.0 if spec.group_score == "max" and keep is None else float("-inf")
        choice = choice.masked_fill(~expert_mask, fill)

    idx = choice.topk(spec.top_k, dim=-1, sorted=False).indices  # [T, k]
    weights = scores.gather(1, idx)  # [T, k]
    if keep is not None:  # fewer kept experts than k: the extra slots hold dropped experts with weight 0
        weights = weights * (keep.gather(1, idx) if keep.dim() == 2 else keep[idx])
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    return idx, weights * spec.routed_scaling_factor

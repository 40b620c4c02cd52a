"""Per-expert compute on transformers 5.x fused expert tensors."""

from __future__ import annotations

import torch


def expert_forward(experts: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """f_e(x) for tokens x [T, H] -> [T, H]: down(act(gate x) * up x), unweighted (not multiplied by its gate)."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)  # [T, I] each
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])  # [T, H]

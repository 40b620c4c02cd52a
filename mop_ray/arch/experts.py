"""Per-expert compute on transformers 5.x fused expert tensors."""

from __future__ import annotations

import torch

from mop_ray.arch.kernels import swiglu


def expert_forward(experts: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """f_e(x) for tokens x [T, H] -> [T, H]: down(act(gate x) * up x), unweighted (not multiplied by its gate)."""
    gate_up = torch.nn.functional.linear(x, experts.gate_up_proj[e])  # [T, 2I]
    return torch.nn.functional.linear(swiglu(gate_up, experts.act_fn), experts.down_proj[e])  # [T, H]

"""Per-expert compute on transformers 5.x fused expert tensors."""

from __future__ import annotations

import torch

from mop_ray.arch.kernels import swiglu


def expert_forward(experts: torch.nn.Module, x: torch.Tensor, e: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """f_e(x) for tokens x [T, H] -> [T, H]: down(act(gate x) * up x), unweighted (not multiplied by its gate);
    written into ``out`` [T, H] when given (a slice of a stacked [E, T, H] tensor)."""
    gate_up = torch.nn.functional.linear(x, experts.gate_up_proj[e])  # [T, 2I]
    act = swiglu(gate_up, experts.act_fn)  # [T, I]
    if out is None:
        return torch.nn.functional.linear(act, experts.down_proj[e])  # [T, H]
    return torch.mm(act, experts.down_proj[e].t(), out=out)  # the same product, into out

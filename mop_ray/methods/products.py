"""Fast reconstruction-loss scoring: every expert runs ONCE on the sampled tokens, then any expert subset is scored
from per-token inner products, never by re-running a masked MoE forward per subset.

For token t with MoE input x, original output z and shared-expert term s (0 when the family has none), the
layer pruned to a kept set S outputs  ŷ = Σ_{j∈top-k_S(t)} w_j f_j(x) + s, so with y = z − s:

    ‖z − ŷ‖² = ‖y‖² − 2 Σ_j w_j ⟨y, f_j⟩ + Σ_{j,l} w_j w_l ⟨f_j, f_l⟩.

``ExpertProducts`` holds ‖y‖² [N], ⟨y, f_e⟩ and ‖f_e‖² for every expert [N, E], and the Gram ⟨f_j, f_l⟩ over
each token's candidate experts [N, c, c] — the experts that can still enter its top-k after removals (all E
under group-limited routing, where group choice can change). Routing for S comes from the recorded router
logits with dropped experts masked (``mop_ray.arch.route``), which equals the physically pruned router.
Per-token inner products are float64 for float32 weights and float32 (fp32-accumulated GEMMs) for bf16/fp16
weights, whose expert outputs carry ~3 significant digits anyway; every sum over tokens and batches is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mop_ray.arch import RouterSpec, route
from mop_ray.arch.experts import expert_forward
from mop_ray.errors import MopError


@dataclass
class ExpertProducts:
    yy: torch.Tensor  # [N] ‖y‖², float64
    yf: torch.Tensor  # [N, E] ⟨y, f_e⟩
    ff: torch.Tensor  # [N, E] ‖f_e‖²
    cand: torch.Tensor  # [N, c] candidate expert ids per token (long)
    pos: torch.Tensor  # [N, E] position of expert e in cand[t], -1 if absent (long)
    gram: torch.Tensor  # [N, c, c] ⟨f_j, f_l⟩ over cand[t]
    logits: torch.Tensor  # [N, E] float32 router logits
    bias: torch.Tensor | None  # [E] e_score_correction_bias (DeepSeek-V3)
    spec: RouterSpec

    @property
    def n_tokens(self) -> int:
        return self.yy.shape[0]

    def token_errors(self, keep: torch.Tensor) -> torch.Tensor:
        """‖z − ŷ_S‖² per token [N] (float64) for the kept mask ``keep`` [E] bool."""
        idx, w = route(self.spec, self.logits, self.bias, keep=keep)  # [N, k]
        w = w.double()
        p = self.pos.gather(1, idx)  # [N, k] positions in cand
        if bool(((p < 0) & (w > 0)).any()):
            raise MopError("internal: a routed expert fell outside the token's candidate list")
        p = p.clamp_min(0)  # zero-weight slots (fewer kept experts than k) may point anywhere
        rows = torch.arange(self.n_tokens, device=p.device)[:, None, None]
        g = self.gram[rows, p[:, :, None], p[:, None, :]]  # [N, k, k]
        cross = (w * self.yf.gather(1, idx)).sum(-1)  # [N]
        quad = torch.einsum("nj,njl,nl->n", w, g, w)  # [N]
        return (self.yy - 2 * cross + quad).clamp_min(0)

    def single_expert_errors(self, weight: torch.Tensor) -> torch.Tensor:
        """‖z − (c_e f_e + s)‖² per token and expert [N, E] for single-expert gate weights ``weight`` [N, E]."""
        weight = weight.double()
        return (self.yy[:, None] - 2 * weight * self.yf + weight.pow(2) * self.ff).clamp_min(0)


def candidate_count(spec: RouterSpec, n_experts: int, min_kept: int) -> int:
    """Experts per token that can be routed to once the layer keeps at least ``min_kept`` experts."""
    if n_experts <= 32 or (spec.group_score is not None and spec.n_group > 1):
        return n_experts  # few experts: the full Gram is cheap; groups: a removal can change the chosen groups
    return min(n_experts, spec.top_k + (n_experts - min_kept))


@torch.no_grad()
def expert_products(moe, family, spec: RouterSpec, x: torch.Tensor, z: torch.Tensor, logits: torch.Tensor,
                    min_kept: int, chunk_tokens: int = 4096, gram_budget_bytes: int = 8 << 30) -> ExpertProducts:
    """Run every expert once over x [N, H] (in token chunks) and reduce to the products above."""
    n_tokens, n_experts = logits.shape
    device = x.device
    c = candidate_count(spec, n_experts, min_kept)
    if n_tokens * c * c * 8 > gram_budget_bytes:
        raise MopError(f"expert Gram of {n_tokens} tokens x {c}^2 candidates needs {n_tokens * c * c * 8 / 1e9:.1f} GB; "
                       f"lower --sample")
    bias = getattr(moe.gate, "e_score_correction_bias", None)
    bias = bias.float() if bias is not None else None
    logits = logits.float().to(device)
    # candidates: the token's experts ranked by the router's choice score (all experts under group routing)
    choice = logits.sigmoid() + bias if spec.scoring == "sigmoid" and bias is not None else logits
    cand = choice.topk(c, dim=-1).indices if c < n_experts else torch.arange(n_experts, device=device).expand(n_tokens, -1)
    cand = cand.contiguous()
    pos = torch.full((n_tokens, n_experts), -1, dtype=torch.long, device=device)
    pos.scatter_(1, cand, torch.arange(c, device=device).expand(n_tokens, -1).contiguous())

    yy = torch.empty(n_tokens, dtype=torch.float64, device=device)
    yf = torch.empty(n_tokens, n_experts, dtype=torch.float64, device=device)
    ff = torch.empty(n_tokens, n_experts, dtype=torch.float64, device=device)
    gram = torch.empty(n_tokens, c, c, dtype=torch.float64, device=device)
    dtype = moe.experts.gate_up_proj.dtype
    prec = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    width = n_experts * x.shape[-1] * torch.finfo(prec).bits // 8
    chunk_tokens = max(1, min(chunk_tokens, (1 << 31) // width))  # one chunk's expert outputs <= 2 GB
    for start in range(0, n_tokens, chunk_tokens):
        sl = slice(start, min(start + chunk_tokens, n_tokens))
        xs = x[sl].to(device=device, dtype=dtype)
        shared = family.shared_output(moe, xs)
        y = z[sl].to(device, prec) - (shared.to(prec) if shared is not None else 0)  # [n, H]
        f = torch.stack([expert_forward(moe.experts, xs, e) for e in range(n_experts)], dim=1).to(prec)  # [n, E, H]
        yy[sl] = y.pow(2).sum(-1).double()
        yf[sl] = torch.bmm(f, y[:, :, None])[..., 0].double()  # [n, E]
        ff[sl] = f.pow(2).sum(-1).double()
        fc = f if c == n_experts else f.gather(1, cand[sl, :, None].expand(-1, -1, f.shape[-1]))  # [n, c, H]
        gram[sl] = torch.bmm(fc, fc.transpose(1, 2)).double()  # [n, c, c]
    return ExpertProducts(yy, yf, ff, cand, pos, gram, logits, bias, spec)

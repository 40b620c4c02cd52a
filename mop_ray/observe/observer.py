"""Per-MoE-layer observation: streaming statistics over all calibration tokens plus a token sample.

For every micro-batch an ``MoEObserver`` gets the MoE block's input X [T, H] and original output Z [T, H]
and computes, with each expert run once over all T tokens (one matmul pair per expert, no token loop):

per (source s, expert e), summed over tokens (float64):
- ``freq``      tokens whose top-k contains e;
- ``reap_sum``  Σ_routed g_e(x)·‖f_e(x)‖₂ with g the renormalised top-k gates (REAP, arXiv 2510.13999 §3);
- ``ean_sum``   Σ_routed ‖f_e(x)‖₂ (expert activation norm);
- ``err_sum``   Σ_all ‖E_e(x) − Z‖² where E_e is the layer with only e kept (MoP Eq. 5–7 before domains);
- ``p_sum``, ``plogp_sum``  Σ p_e and Σ p_e·log2 p_e of the full-softmax router probability, from which
  MoP Eq. 2 is exact: S_var(e) = plogp_sum/p_sum − log2 p_sum + log2 N;
and ``tokens`` per source. The sample rows (X, Z, router logits, source, block, position) go to Parquet.
"""

from __future__ import annotations

import numpy as np
import torch

from mop_ray.arch import Family, RouterSpec, route
from mop_ray.arch.experts import expert_forward
from mop_ray.observe.records import STAT_FIELDS, SampleWriter, bf16_bits


def single_expert_weight(spec: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    """Gate weight of expert e when it is the only kept expert, [T, E] (MoP's E_i(x) = w·f_i(x) + shared)."""
    if spec.scoring == "softmax" or spec.norm_topk_prob:
        return torch.full_like(logits, spec.routed_scaling_factor)  # softmax over one kept row = 1
    return logits.sigmoid() * spec.routed_scaling_factor  # un-normalised sigmoid gate


class MoEObserver:
    def __init__(self, layer: int, family: Family, spec: RouterSpec, n_experts: int, n_sources: int,
                 sample_writer: SampleWriter | None):
        self.layer, self.family, self.spec = layer, family, spec
        self.n_experts, self.n_sources = n_experts, n_sources
        self.stats = {f: np.zeros((n_sources, n_experts), dtype=np.float64) for f in STAT_FIELDS}
        self.tokens = np.zeros(n_sources, dtype=np.int64)
        self.sample_writer = sample_writer

    @torch.no_grad()
    def observe(self, moe: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, source: torch.Tensor,
                sample: torch.Tensor | None, block: torch.Tensor, pos: torch.Tensor) -> None:
        """x, z: [T, H] MoE input/output; source, block, pos: [T] int; sample: [T] bool rows to record."""
        gate = moe.gate
        logits = torch.nn.functional.linear(x.float(), gate.weight.float())  # [T, E]
        bias = getattr(gate, "e_score_correction_bias", None)
        idx, w = route(self.spec, logits, bias)  # [T, k] ids and gate weights
        g = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # [T, k] renormalised top-k gates (REAP)
        p = logits.double().softmax(dim=-1)  # [T, E] full-softmax probabilities (MoP Eq. 2)
        shared = self.family.shared_output(moe, x)
        base = -z.float() if shared is None else shared.float() - z.float()  # E_e(x) − Z = c·f_e + base
        c = single_expert_weight(self.spec, logits)  # [T, E]

        T, E = logits.shape
        routed_gate = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_(1, idx, g)  # [T, E]
        routed = torch.zeros(T, E, dtype=torch.bool, device=x.device).scatter_(1, idx, True)  # [T, E]
        norms = torch.empty(T, E, dtype=torch.float32, device=x.device)
        err = torch.empty(T, E, dtype=torch.float64, device=x.device)
        for e in range(E):  # one batched expert evaluation over all T tokens
            f = expert_forward(moe.experts, x, e).float()  # [T, H]
            norms[:, e] = f.norm(dim=-1)
            err[:, e] = (c[:, e, None] * f + base).double().pow(2).sum(dim=-1)

        per_token = {
            "freq": routed.double(),
            "reap_sum": (routed_gate * norms).double(),
            "ean_sum": (routed * norms).double(),
            "err_sum": err,
            "p_sum": p,
            "plogp_sum": torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p)),
        }
        src = source.to(x.device, torch.long)
        for name, values in per_token.items():
            acc = torch.zeros(self.n_sources, E, dtype=torch.float64, device=x.device).index_add_(0, src, values)
            self.stats[name] += acc.cpu().numpy()
        self.tokens += np.bincount(source.cpu().numpy(), minlength=self.n_sources)

        if self.sample_writer is not None and sample is not None and bool(sample.any()):
            rows = sample.to(x.device)
            if x.dtype == torch.bfloat16 and z.dtype == torch.bfloat16:  # stored as bf16 bits: exact, half the bytes
                xs, zs = bf16_bits(x[rows]), bf16_bits(z[rows])
            else:
                xs, zs = x[rows].float().cpu().numpy(), z[rows].float().cpu().numpy()
            self.sample_writer.write(
                x=xs, z=zs, logits=logits[rows].cpu().numpy(),
                source=source[sample.cpu()].numpy(), block=block[sample.cpu()].numpy(), pos=pos[sample.cpu()].numpy(),
            )

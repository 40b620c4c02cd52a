"""enu: NAEE's enumeration pruning (Lu et al., ACL 2024, arXiv 2402.14800).

S* = argmin_{|S| = r} L(S),  L(S) = Σ_b ‖Z_b − F_S(X_b)‖_F            (NAEE §3, Frobenius, not squared)

over the cached calibration batches b (NAEE: 16 batches of 8 × 2048 tokens; here the sampled tokens grouped
by calibration block into ``enu_batches`` batches), with the dropped experts' router logits masked to −inf,
the family's own top-k renormalisation and the shared-expert term. All C(n, r) sets are scored when there
are at most ``enu_max_sets`` of them; otherwise greedy backward elimination removes, one at a time, the
expert whose removal raises L least (MoP's choice for Qwen's 60 experts). Under DeepSeek group-limited
routing only sets that keep the same number in every group are considered.

Greedy elimination is scored incrementally (``mop_ray.methods.greedy``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from mop_ray.methods.base import Choice, LayerContext, register
from mop_ray.methods.greedy import greedy, trial_losses
from mop_ray.methods.products import ExpertProducts, expert_products, recorded_products

DEFAULT_MAX_SETS = 5000
DEFAULT_BATCHES = 16


def layer_products(ctx: LayerContext, min_kept: int) -> tuple[ExpertProducts, torch.Tensor, object]:
    """Expert products of this layer's sample and the NAEE batch id of every sampled token [N]."""
    sample = ctx.records.sample
    moe, ckpt = ctx.moe_block()
    spec = ckpt.family.router_spec(ckpt.config)
    dev = ctx.device
    logits = sample.tensor("logits", dev)  # [N, E] float32
    cap = ctx.params.get("enu_candidates")
    if sample.has_products and cap is None:  # recorded up to RECORD_UP_TO experts, whose candidate lists are exact
        prods = recorded_products(moe, spec, *sample.products(dev), logits, min_kept)  # the observer's: no expert runs
    else:
        x = sample.tensor("x", dev)  # [N, H] float32
        z = sample.tensor("z", dev)  # [N, H] float32
        prods = expert_products(moe, ckpt.family, spec, x, z, logits, min_kept, None if cap is None else int(cap))
    n_batches = int(ctx.params.get("enu_batches", DEFAULT_BATCHES))
    n_blocks = int(sample.block.max()) + 1
    per = math.ceil(n_blocks / n_batches)
    batch = torch.from_numpy(sample.block.astype(np.int64) // per).to(dev)  # [N]
    return prods, batch, (moe, ckpt, sample)


@torch.no_grad()
def set_loss(prods: ExpertProducts, batch: torch.Tensor, keep: torch.Tensor) -> float:
    """L(S) = Σ_b sqrt(Σ_{t∈b} ‖z_t − ŷ_t‖²) for the kept mask ``keep`` [E] (float64)."""
    err = prods.token_errors(keep)  # [N]
    per_batch = torch.zeros(int(batch.max()) + 1, dtype=torch.float64, device=err.device).index_add_(0, batch, err)
    return float(per_batch.sqrt().sum())


def _mask(ids, n: int, device) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[list(ids)] = True
    return m


def candidate_sets(n: int, r: int, groups: int):
    """All kept sets of size r, r/groups from each contiguous group (plain combinations when groups == 1)."""
    size, per = n // groups, r // groups
    per_group = [itertools.combinations(range(g * size, (g + 1) * size), per) for g in range(groups)]
    for parts in itertools.product(*per_group):
        yield tuple(e for part in parts for e in part)


def n_candidate_sets(n: int, r: int, groups: int) -> int:
    return math.comb(n // groups, r // groups) ** groups


def search(prods: ExpertProducts, batch: torch.Tensor, n: int, r: int, groups: int = 1,
           max_sets: int = DEFAULT_MAX_SETS) -> tuple[list[int], dict]:
    """The kept set minimising L: exhaustive when affordable, else greedy backward elimination."""
    device = prods.logits.device
    total = n_candidate_sets(n, r, groups)
    if total <= max_sets:
        losses = [(set_loss(prods, batch, _mask(s, n, device)), s) for s in candidate_sets(n, r, groups)]
        losses.sort(key=lambda t: (t[0], t[1]))
        best = list(losses[0][1])
        return best, {"mode": "exhaustive", "sets_scored": total, "loss": losses[0][0],
                      "best_sets": [{"kept": list(s), "loss": l} for l, s in losses[:20]]}
    return greedy(prods, batch, n, r, groups)


def drop_one_losses(prods: ExpertProducts, batch: torch.Tensor, n: int) -> np.ndarray:
    """L(all − {e}) for every expert e [n]: how much removing e alone hurts (higher = more worth keeping)."""
    keep = torch.ones(n, dtype=torch.bool, device=prods.logits.device)
    return trial_losses(prods, batch, keep, list(range(n))).cpu().numpy()


@register("enu", needs_records=True, needs_weights=True, set_based=True,
          summary="NAEE: the r experts minimising reconstruction loss (exhaustive or greedy)")
def enu(ctx: LayerContext, r: int) -> Choice:
    prods, batch, _ = layer_products(ctx, min_kept=r)
    n = ctx.num_experts
    kept, details = search(prods, batch, n, r, ctx.groups, int(ctx.params.get("enu_max_sets", DEFAULT_MAX_SETS)))
    return Choice(drop_one_losses(prods, batch, n), kept, details)

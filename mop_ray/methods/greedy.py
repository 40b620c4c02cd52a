"""Greedy backward elimination for enu, scored incrementally and exactly.

One step removes the expert e whose removal raises L(S) = Σ_b sqrt(Σ_{t∈b} ‖z_t − ŷ_t‖²) least (NAEE §3;
MoP's choice when C(n, r) is too large). Removing e changes only some tokens' routes:
- tokens routed to e lose it; if their chosen groups stay the same, the replacement is the next-best kept expert
  in those groups, known from one top-(k+1) per step — no routing pass per trial;
- under group-limited routing (DeepSeek), tokens whose chosen group has e among the experts that set its score
  (top 1 for "max", top 2 for "top2_sum") may switch groups: the group's score without e is known from its
  top 3, and only tokens where it falls to the best unchosen group's score are routed again in full;
- every other token keeps its route; for softmax gates without top-k renormalisation its weights grow by
  1/(1 − p_e), whose error the products give in closed form.
So a step costs ~k re-routed (token, trial) pairs per token plus the rare group switches, not one full routing
pass per trial: DeepSeek-V3 256 → 128 over a 65,536-token sample takes 1.5 s on an H200 (RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mop_ray.arch import RouterSpec, route
from mop_ray.methods.products import ExpertProducts

NEG = float("-inf")


def gates(spec: RouterSpec, s: torch.Tensor) -> torch.Tensor:
    """Gate weights [P, k] from the chosen experts' scores s [P, k], as ``mop_ray.arch.route`` finishes them."""
    if spec.norm_topk_prob:
        s = s / (s.sum(dim=-1, keepdim=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    return s * spec.routed_scaling_factor


@dataclass
class RouteState:
    """Every token's routing under one kept set."""

    nxt: torch.Tensor  # [N, k+1] its k+1 best kept experts in its chosen groups, best first (first k = its route)
    scores: torch.Tensor  # [N, E] gate scores under the kept set (softmax over kept rows, or sigmoid)
    switch: torch.Tensor | None  # [N, E] bool: removing e alone can change the token's chosen groups


_TRIANGLES: dict = {}


def _prefix_count(kept: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix counts of ``kept`` [..., L] along the last dim (int32). On CUDA a half-precision matmul
    with a triangle of ones (exact: counts ≤ L ≤ 2048), which beats the scan kernel ~50× on 65k rows of 256."""
    width = kept.shape[-1]
    if kept.device.type != "cuda" or width > 2048:
        return kept.cumsum(-1, dtype=torch.int32)
    key = (width, kept.device)
    if key not in _TRIANGLES:
        _TRIANGLES[key] = torch.ones(width, width, dtype=torch.float16, device=kept.device).triu()  # [L, L]
    return (kept.to(torch.float16) @ _TRIANGLES[key]).to(torch.int32)


def _first_kept(order: torch.Tensor, kept: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n entries of ``order`` [..., L] whose ``kept`` [..., L] is set: ids [..., n] (-1 past the end)
    and whether all n exist [...]. A prefix count and a scatter, no top-k (slow on wide rows)."""
    rank = _prefix_count(kept)  # [..., L]
    slot = torch.where(kept & (rank <= n), rank - 1, n).long()  # [..., L] column n collects the rest
    out = torch.full((*order.shape[:-1], n + 1), -1, dtype=order.dtype, device=order.device)
    return out.scatter_(-1, slot, order)[..., :n], rank[..., -1] >= n


def route_rows(prods: ExpertProducts, tok: torch.Tensor, keep: torch.Tensor, n: int):
    """Routing of tokens ``tok`` [P] under kept sets ``keep`` ([E], or one per row [P, E]) from each token's
    experts presorted by router choice (``ExpertProducts.orders``): the n best kept experts in the chosen
    groups, best first [P, n], whether every row has n, and for group routing the per-group top (m+1) ids
    and values [P, G, m+1], the chosen groups [P, G] bool and the best unchosen group's score [P]."""
    spec = prods.spec
    order, gorder, values = prods.orders()
    order, n_experts = order[tok], order.shape[1]  # [P, E]
    rows = keep[order] if keep.dim() == 1 else keep.gather(1, order)  # [P, E] kept, in choice order
    groups = None
    if spec.group_score is not None and spec.n_group > 1:
        n_group, size, tg = spec.n_group, n_experts // spec.n_group, spec.topk_group
        m = 1 if spec.group_score == "max" else 2  # experts that set a group's score
        go = gorder[tok]  # [P, G, S]
        gk = keep[go] if keep.dim() == 1 else keep.gather(1, go.flatten(1)).view(go.shape)
        ids, _ = _first_kept(go, gk, m + 1)  # [P, G, m+1]
        val = values[tok[:, None, None], ids.clamp_min(0)].masked_fill(ids < 0, NEG)  # [P, G, m+1]
        score = val[..., 0] if m == 1 else val[..., 0] + val[..., 1]  # [P, G]
        gi = torch.arange(n_group, device=tok.device)
        above = (score[:, None, :] > score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & (gi[None, None, :] < gi[None, :, None]))
        place = above.sum(-1)  # [P, G] rank of each group, ties to the lower group id
        chosen = place < tg
        runner_up = score.masked_fill(place != tg, NEG).max(-1).values  # [P]
        rows = rows & chosen.gather(1, order // size)
        groups = (ids, val, chosen, runner_up)
    nxt, full = _first_kept(order, rows, n)
    return nxt, full, groups


def route_state(prods: ExpertProducts, keep: torch.Tensor) -> RouteState | None:
    """The state above, or None when some token has fewer than k+1 kept experts in its chosen groups."""
    spec, logits = prods.spec, prods.logits
    n_tokens, n_experts = logits.shape
    tok = torch.arange(n_tokens, device=logits.device)
    nxt, full, groups = route_rows(prods, tok, keep, spec.top_k + 1)
    if not bool(full.all()):
        return None
    scores = logits.masked_fill(~keep, NEG).softmax(-1) if spec.scoring == "softmax" else logits.sigmoid()  # [N, E]
    switch = None
    if groups is not None:
        ids, v, chosen, runner_up = groups
        m = 1 if spec.group_score == "max" else 2
        # the group's score without its j-th best expert (j < m): the next one moves up
        without = v[..., 1:2] if m == 1 else torch.stack([v[..., 1] + v[..., 2], v[..., 0] + v[..., 2]], -1)
        flips = (without <= runner_up[:, None, None]) & chosen[..., None]  # [N, G, m]
        # a group with fewer than m kept experts has id -1 there: those go to a spare column, never onto expert 0
        slots = torch.where(ids[..., :m] >= 0, ids[..., :m], n_experts).reshape(n_tokens, -1)
        switch = torch.zeros(n_tokens, n_experts + 1, dtype=torch.bool, device=logits.device)
        switch = switch.scatter_(1, slots, flips.reshape(n_tokens, -1))[:, :n_experts]
    return RouteState(nxt, scores, switch)


def _group_members(prods: ExpertProducts, keep: torch.Tensor) -> torch.Tensor:
    """[N, E] bool: e sets the score of one of the token's chosen groups (removing it may switch groups)."""
    spec, (n_tokens, n_experts) = prods.spec, prods.logits.shape
    size = n_experts // spec.n_group
    ch = prods.logits.masked_fill(~keep, NEG)
    ch = ch.softmax(-1) if spec.scoring == "softmax" else prods.choice.masked_fill(~keep, NEG)
    m = min(size, 1 if spec.group_score == "max" else 2)
    top = ch.view(n_tokens, spec.n_group, size).topk(m, dim=-1)  # [N, G, m]
    group = top.values[..., 0] if m == 1 else top.values.sum(-1)  # [N, G]
    chosen = group.topk(spec.topk_group, dim=-1).indices  # [N, tg]
    ids = top.indices + torch.arange(spec.n_group, device=ch.device)[None, :, None] * size  # [N, G, m]
    ids = ids.gather(1, chosen[:, :, None].expand(-1, -1, m)).reshape(n_tokens, -1)  # [N, tg·m]
    return torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=ch.device).scatter_(1, ids, True)


@torch.no_grad()
def trial_losses(prods: ExpertProducts, batch: torch.Tensor, keep: torch.Tensor, options: list[int],
                 fast: bool = True, n_batches: int | None = None) -> torch.Tensor:
    """L(keep − {e}) for every e in ``options`` [O] (float64), incrementally from the routes under ``keep``.

    ``fast=False`` (and any state with fewer than k+1 kept experts in a token's groups) routes every affected
    (token, trial) pair in full with ``mop_ray.arch.route`` — the reference the fast path is tested against.
    """
    spec, logits = prods.spec, prods.logits
    n_tokens, n_experts = logits.shape
    dev, k = logits.device, spec.top_k
    opts = torch.as_tensor(options, dtype=torch.long, device=dev)  # [O]
    tokens = torch.arange(n_tokens, device=dev)
    state = route_state(prods, keep) if fast else None
    if state is not None:
        idx = state.nxt[:, :k]  # [N, k]
        w = gates(spec, state.scores.gather(1, idx))
        routed = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=dev).scatter_(1, idx, True)
        full = state.switch  # pairs routed again in full: group switches only
        hit = routed if full is None else routed | full
    else:
        idx, w = route(spec, logits, prods.bias, keep=keep)  # [N, k]
        hit = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=dev).scatter_(1, idx, w > 0)
        if spec.group_score is not None and spec.n_group > 1:
            hit |= _group_members(prods, keep)
        full = hit
    cross, quad = prods.pair_parts(tokens, idx, w, keep)  # [N]
    hit = hit[:, opts]  # [N, O]
    n_batches = int(batch.max()) + 1 if n_batches is None else n_batches
    if spec.scoring == "softmax" and not spec.norm_topk_prob:  # kept-softmax gates grow by 1/(1 − p_e)
        p = (state.scores if state is not None else logits.masked_fill(~keep, NEG).softmax(-1))[:, opts].double()  # [N, O]
        s = 1 / (1 - p).clamp_min(1e-300)
        base = (prods.yy[:, None] - 2 * s * cross[:, None] + s * s * quad[:, None]).clamp_min(0)  # [N, O]
        sums = torch.zeros(n_batches, len(options), dtype=torch.float64, device=dev)  # [B, O]
        sums.index_add_(0, batch, base.masked_fill(hit, 0))
        flat = sums.view(-1)
    else:  # unchanged tokens keep their error: every trial starts from the batch sums, minus its hit tokens
        err = (prods.yy - 2 * cross + quad).clamp_min(0)  # [N]
        per_batch = torch.zeros(n_batches, dtype=torch.float64, device=dev).index_add_(0, batch, err)  # [B]
        sums = per_batch[:, None].repeat(1, len(options))  # [B, O]
        flat = sums.view(-1)
        tok, o = hit.nonzero(as_tuple=True)
        flat.index_add_(0, batch[tok] * len(options) + o, -err[tok])

    if state is not None:  # routed pairs that keep their groups: drop e, the (k+1)-th expert moves up
        tok, o = (hit & ~full[:, opts] if full is not None else hit).nonzero(as_tuple=True)  # [P]
        e = opts[o]
        nxt = state.nxt[tok]  # [P, k+1]
        ids = nxt[nxt != e[:, None]].view(-1, k)  # [P, k]
        s = state.scores[tok[:, None], ids]  # [P, k]
        if spec.scoring == "softmax":
            s = s / (1 - state.scores[tok, e])[:, None]  # softmax over the kept rows without e
        flat.index_add_(0, batch[tok] * len(options) + o, prods.pair_errors(tok, ids, gates(spec, s), keep))
    if full is not None:  # pairs routed again in full
        tok, o = full[:, opts].nonzero(as_tuple=True) if state is not None else hit.nonzero(as_tuple=True)
        step = max(1, (32 << 20) // n_experts)
        for start in range(0, tok.shape[0], step):
            t, j = tok[start:start + step], o[start:start + step]
            trial = keep.expand(t.shape[0], -1).clone()  # [p, E]
            trial[torch.arange(t.shape[0], device=dev), opts[j]] = False
            i2, ok, _ = route_rows(prods, t, trial, k) if state is not None else (None, None, None)  # [p, k]
            if state is not None and bool(ok.all()):  # presorted routing; gates without e as in the fast path
                s = state.scores[t[:, None], i2]
                if spec.scoring == "softmax":
                    s = s / (1 - state.scores[t, opts[j]])[:, None]
                w2 = gates(spec, s)
            else:
                i2, w2 = route(spec, logits[t], prods.bias, keep=trial)
            flat.index_add_(0, batch[t] * len(options) + j, prods.pair_errors(t, i2, w2, keep))
    return sums.clamp_min(0).sqrt().sum(0)  # clamp: subtracting hit errors can leave -1e-16 for an empty batch


def greedy(prods: ExpertProducts, batch: torch.Tensor, n: int, r: int, groups: int = 1) -> tuple[list[int], dict]:
    """Remove experts one at a time (the one raising L least; ties to the lower id) until r are left, r/groups
    in every routing group."""
    keep = torch.ones(n, dtype=torch.bool, device=prods.logits.device)
    size, per = n // groups, r // groups
    trace, scored = [], 0
    n_batches = int(batch.max()) + 1
    while int(keep.sum()) > r:  # one sync per step
        kept_now = keep.tolist()  # one device sync, not one per expert
        counts = [sum(kept_now[g * size:(g + 1) * size]) for g in range(groups)]
        options = [e for e in range(n) if kept_now[e] and counts[e // size] > per]
        losses = trial_losses(prods, batch, keep, options, n_batches=n_batches)  # [O]
        best = int(losses.argmin())  # the first minimum: ties go to the lower id
        keep[options[best]] = False
        scored += len(options)
        trace.append({"dropped": options[best], "loss": float(losses[best])})
    kept = keep.nonzero()[:, 0].tolist()
    return kept, {"mode": "greedy", "sets_scored": scored, "loss": trace[-1]["loss"], "trace": trace,
                  "candidates": prods.n_candidates, "rebuilt_tokens": prods.refreshed, "direct_pairs": prods.direct}

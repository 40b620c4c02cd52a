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
Each token's trial errors (``TokenTrials``) depend only on a few of the kept experts — its next k+1, the top
m+1 of every routing group, and for a token that may switch groups the first k+1 of every group — so after a
step only the tokens that watched the removed expert are scored again (``TrialTable``); the others keep
their rows. A step costs ~k re-routed (token, trial) pairs per changed token plus the rare group switches,
not one full routing pass per trial: timings for DeepSeek-V3 256 → 128 over 65,536 tokens in RESULTS.md.
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


def _grouped(spec: RouterSpec) -> bool:
    return spec.group_score is not None and spec.n_group > 1


def _dense(spec: RouterSpec) -> bool:
    """Softmax gates without top-k renormalisation: every token's weights change with the kept set."""
    return spec.scoring == "softmax" and not spec.norm_topk_prob


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
    if _grouped(spec):
        n_group, tg = spec.n_group, spec.topk_group
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
        in_chosen = chosen[:, :, None].expand(-1, -1, n_experts // n_group).reshape(-1, n_experts)  # [P, E] by id
        rows = rows & in_chosen.gather(1, order)
        groups = (ids, val, chosen, runner_up)
    nxt, full = _first_kept(order, rows, n)
    return nxt, full, groups


@dataclass
class TokenTrials:
    """Trial errors of some tokens under one kept set."""

    err: torch.Tensor  # [P] ‖z − ŷ‖² under the kept set (float64)
    delta: torch.Tensor  # [P, E] its change when kept expert e is also removed (float64; 0 where unchanged)
    watch: torch.Tensor  # [P, E] bool: removing e may change the token's routes, so its row must be rescored


def token_trials(prods: ExpertProducts, tok: torch.Tensor, keep: torch.Tensor, fast: bool = True) -> TokenTrials:
    """Every kept expert's trial (keep − {e}) for tokens ``tok`` [P]. Tokens with k+1 kept experts in their
    chosen groups take the incremental path above; the rest (and all with ``fast=False``, the reference the
    fast path is tested against) route every affected (token, trial) pair in full with ``mop_ray.arch.route``."""
    spec, logits = prods.spec, prods.logits
    n_experts, k, dev = logits.shape[1], spec.top_k, logits.device
    err = torch.empty(tok.shape[0], dtype=torch.float64, device=dev)
    delta = torch.zeros(tok.shape[0], n_experts, dtype=torch.float64, device=dev)
    watch = torch.ones(tok.shape[0], n_experts, dtype=torch.bool, device=dev)
    if fast:
        nxt, ok, groups = route_rows(prods, tok, keep, k + 1)
        sel = ok.nonzero()[:, 0]  # [F] rows on the fast path
        if sel.shape[0]:
            grp = None if groups is None else tuple(g[sel] for g in groups)
            err[sel], delta[sel], watch[sel] = _fast_rows(prods, tok[sel], keep, nxt[sel], grp)
        slow = (~ok).nonzero()[:, 0]
    else:
        slow = torch.arange(tok.shape[0], device=dev)
    if slow.shape[0]:
        err[slow], delta[slow] = _full_rows(prods, tok[slow], keep)
    return TokenTrials(err, delta, watch)


def _scores(prods: ExpertProducts, tok: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Gate scores [P, E] under the kept set: softmax over the kept rows, or sigmoid."""
    logits = prods.logits[tok]
    return logits.masked_fill(~keep, NEG).softmax(-1) if prods.spec.scoring == "softmax" else logits.sigmoid()


def _dense_base(prods, tok, scores, cross, quad, keep) -> torch.Tensor:
    """Errors [P, E] of unchanged routes when e leaves a softmax without renormalisation: weights × 1/(1 − p_e)."""
    s = 1 / (1 - scores.double()).clamp_min(1e-300)
    return (prods.yy[tok, None] - 2 * s * cross[:, None] + s * s * quad[:, None]).clamp_min(0) * keep


def _fast_rows(prods, tok, keep, nxt, groups):
    spec = prods.spec
    n_tokens, n_experts, k, dev = tok.shape[0], prods.logits.shape[1], spec.top_k, tok.device
    scores = _scores(prods, tok, keep)  # [P, E]
    idx = nxt[:, :k]  # [P, k]
    cross, quad = prods.pair_parts(tok, idx, gates(spec, scores.gather(1, idx)), keep)  # [P]
    err = (prods.yy[tok] - 2 * cross + quad).clamp_min(0)  # [P]
    routed = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=dev).scatter_(1, idx, True)
    watch = torch.zeros(n_tokens, n_experts + 1, dtype=torch.bool, device=dev).scatter_(1, nxt, True)
    switch = None
    if groups is not None:
        ids, v, chosen, runner_up = groups
        m = ids.shape[-1] - 1
        # the group's score without its j-th best expert (j < m): the next one moves up
        without = v[..., 1:2] if m == 1 else torch.stack([v[..., 1] + v[..., 2], v[..., 0] + v[..., 2]], -1)
        flips = (without <= runner_up[:, None, None]) & chosen[..., None]  # [P, G, m]
        # a group with fewer than m kept experts has id -1 there: those go to a spare column, never onto expert 0
        spare = lambda t: torch.where(t >= 0, t, n_experts).flatten(1)  # noqa: E731
        switch = torch.zeros(n_tokens, n_experts + 1, dtype=torch.bool, device=dev)
        switch = switch.scatter_(1, spare(ids[..., :m]), flips.reshape(n_tokens, -1))[:, :n_experts]
        # what the routes depend on besides nxt: the scores and next experts of the chosen groups, and for a
        # token that may switch, the score of the best unchosen group(s) (ties included)
        score = v[..., 0] if m == 1 else v[..., 0] + v[..., 1]  # [P, G]
        runner = ~chosen & (score == runner_up[:, None])  # [P, G]
        movers = switch.any(-1)  # [P]
        watch.scatter_(1, spare(ids.masked_fill(~chosen[..., None], -1)), True)
        watch.scatter_(1, spare(ids[..., :m].masked_fill(~(runner & movers[:, None])[..., None], -1)), True)
    delta = torch.zeros(n_tokens, n_experts, dtype=torch.float64, device=dev)
    if _dense(spec):  # every trial changes every token's weights
        hit = routed if switch is None else routed | switch
        delta = (_dense_base(prods, tok, scores, cross, quad, keep) - err[:, None]).masked_fill(hit | ~keep, 0)
        watch[:] = True  # (the spare column too)
    # routed pairs that keep their groups: drop e, the (k+1)-th expert moves up
    p, e = (routed if switch is None else routed & ~switch).nonzero(as_tuple=True)  # [Q]
    pick = nxt[p]  # [Q, k+1]
    ids = pick[pick != e[:, None]].view(-1, k)  # [Q, k]
    s = scores[p[:, None], ids]  # [Q, k]
    if spec.scoring == "softmax":
        s = s / (1 - scores[p, e])[:, None]  # softmax over the kept rows without e
    delta[p, e] = prods.pair_errors(tok[p], ids, gates(spec, s), keep) - err[p]
    if switch is not None:  # pairs that may switch groups: routed again in full
        p, e = switch.nonzero(as_tuple=True)
        step = max(1, (32 << 20) // n_experts)
        for start in range(0, p.shape[0], step):
            pp, ee = p[start:start + step], e[start:start + step]
            t = tok[pp]
            trial = keep.expand(t.shape[0], -1).clone()  # [q, E]
            trial[torch.arange(t.shape[0], device=dev), ee] = False
            i2, ok, _ = route_rows(prods, t, trial, k)  # [q, k]
            if bool(ok.all()):  # presorted routing; gates without e as in the path above
                s = scores[pp[:, None], i2]
                if spec.scoring == "softmax":
                    s = s / (1 - scores[pp, ee])[:, None]
                w2 = gates(spec, s)
                watch[pp[:, None], i2] = True  # the new route: the rest of its groups come after these
            else:
                i2, w2 = route(spec, prods.logits[t], prods.bias, keep=trial)
                watch[pp] = True  # fewer than k kept in the new groups: rescore on any removal
            delta[pp, ee] = prods.pair_errors(t, i2, w2, keep) - err[pp]
    return err, delta, watch[:, :n_experts]


def _group_members(prods: ExpertProducts, tok: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[P, E] bool: e sets the score of one of the token's chosen groups (removing it may switch groups)."""
    spec, n_experts = prods.spec, prods.logits.shape[1]
    n_tokens, size = tok.shape[0], n_experts // spec.n_group
    ch = prods.logits[tok].masked_fill(~keep, NEG)
    ch = ch.softmax(-1) if spec.scoring == "softmax" else prods.choice[tok].masked_fill(~keep, NEG)
    m = min(size, 1 if spec.group_score == "max" else 2)
    top = ch.view(n_tokens, spec.n_group, size).topk(m, dim=-1)  # [P, G, m]
    group = top.values[..., 0] if m == 1 else top.values.sum(-1)  # [P, G]
    chosen = group.topk(spec.topk_group, dim=-1).indices  # [P, tg]
    ids = top.indices + torch.arange(spec.n_group, device=ch.device)[None, :, None] * size  # [P, G, m]
    ids = ids.gather(1, chosen[:, :, None].expand(-1, -1, m)).reshape(n_tokens, -1)  # [P, tg·m]
    return torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=ch.device).scatter_(1, ids, True)


def _full_rows(prods, tok, keep):
    """The reference: every (token, trial) pair whose route may change is routed again with ``route``."""
    spec, logits = prods.spec, prods.logits
    n_tokens, n_experts, dev = tok.shape[0], logits.shape[1], tok.device
    idx, w = route(spec, logits[tok], prods.bias, keep=keep)  # [P, k]
    hit = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=dev).scatter_(1, idx, w > 0)
    if _grouped(spec):
        hit |= _group_members(prods, tok, keep)
    hit &= keep
    cross, quad = prods.pair_parts(tok, idx, w, keep)
    err = (prods.yy[tok] - 2 * cross + quad).clamp_min(0)  # [P]
    delta = torch.zeros(n_tokens, n_experts, dtype=torch.float64, device=dev)
    if _dense(spec):
        base = _dense_base(prods, tok, _scores(prods, tok, keep), cross, quad, keep)
        delta = (base - err[:, None]).masked_fill(hit | ~keep, 0)
    p, e = hit.nonzero(as_tuple=True)
    step = max(1, (32 << 20) // n_experts)
    for start in range(0, p.shape[0], step):
        pp, ee = p[start:start + step], e[start:start + step]
        trial = keep.expand(pp.shape[0], -1).clone()  # [q, E]
        trial[torch.arange(pp.shape[0], device=dev), ee] = False
        i2, w2 = route(spec, logits[tok[pp]], prods.bias, keep=trial)
        delta[pp, ee] = prods.pair_errors(tok[pp], i2, w2, keep) - err[pp]
    return err, delta


class TrialTable:
    """Every token's trial rows under the current kept set, rescored only where a removal reaches them."""

    def __init__(self, prods: ExpertProducts, batch: torch.Tensor, keep: torch.Tensor,
                 n_batches: int | None = None, fast: bool = True):
        self.prods, self.keep, self.fast = prods, keep.clone(), fast
        n_batches = int(batch.max()) + 1 if n_batches is None else n_batches
        dev = prods.logits.device
        self.onehot = torch.zeros(n_batches, batch.shape[0], dtype=torch.float64, device=dev)  # [B, N]
        self.onehot[batch, torch.arange(batch.shape[0], device=dev)] = 1
        rows = token_trials(prods, torch.arange(prods.n_tokens, device=dev), self.keep, fast)
        self.err, self.delta, self.watch = rows.err, rows.delta, rows.watch  # [N], [N, E], [N, E]
        self.rescored = 0  # token rows scored again after removals

    def remove(self, e: int) -> None:
        self.keep[e] = False
        tok = self.watch[:, e].nonzero()[:, 0]  # [P]
        rows = token_trials(self.prods, tok, self.keep, self.fast)
        self.err[tok], self.delta[tok], self.watch[tok] = rows.err, rows.delta, rows.watch
        self.rescored += int(tok.shape[0])

    def losses(self, options: torch.Tensor) -> torch.Tensor:
        """L(keep − {e}) [O] (float64) for the experts ``options`` [O]."""
        sums = self.onehot @ (self.err[:, None] + self.delta[:, options])  # [B, O] one GEMM, no atomics
        return sums.clamp_min(0).sqrt().sum(0)  # clamp: a batch may sum to -1e-16 (errors cancel)


@torch.no_grad()
def trial_losses(prods: ExpertProducts, batch: torch.Tensor, keep: torch.Tensor, options: list[int],
                 fast: bool = True, n_batches: int | None = None) -> torch.Tensor:
    """L(keep − {e}) for every e in ``options`` [O] (float64), incrementally from the routes under ``keep``."""
    opts = torch.as_tensor(options, dtype=torch.long, device=prods.logits.device)  # [O]
    return TrialTable(prods, batch, keep, n_batches, fast).losses(opts)


@torch.no_grad()
def greedy(prods: ExpertProducts, batch: torch.Tensor, n: int, r: int, groups: int = 1) -> tuple[list[int], dict]:
    """Remove experts one at a time (the one raising L least; ties to the lower id) until r are left, r/groups
    in every routing group."""
    keep = torch.ones(n, dtype=torch.bool, device=prods.logits.device)
    size, per = n // groups, r // groups
    trace, scored = [], 0
    table = TrialTable(prods, batch, keep)
    kept_now = [True] * n
    while sum(kept_now) > r:
        counts = [sum(kept_now[g * size:(g + 1) * size]) for g in range(groups)]
        options = [e for e in range(n) if kept_now[e] and counts[e // size] > per]
        losses = table.losses(torch.tensor(options, device=keep.device)).tolist()  # [O] one device sync per step
        best = min(range(len(options)), key=losses.__getitem__)  # the first minimum: ties go to the lower id
        kept_now[options[best]] = False
        if sum(kept_now) > r:
            table.remove(options[best])
        scored += len(options)
        trace.append({"dropped": options[best], "loss": losses[best]})
    kept = [e for e in range(n) if kept_now[e]]
    return kept, {"mode": "greedy", "sets_scored": scored, "loss": trace[-1]["loss"], "trace": trace,
                  "candidates": prods.n_candidates, "rebuilt_tokens": prods.refreshed, "direct_pairs": prods.direct,
                  "rescored_tokens": table.rescored}

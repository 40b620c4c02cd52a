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
m+1 of its chosen groups, and for a token that may switch groups the best unchosen group's top m and its
re-routed experts — so after a step only the tokens that watched the removed expert are scored again
(``TrialTable``); the others keep their rows. The rows are computed with fixed shapes and no host sync (a token's
k routed trials as k+1 gathered routes, possible group switches as fixed slots), so on a GPU a step is one
captured CUDA graph; the rare rows that need more (a route outside the token's candidate list) are rescored
in full. DeepSeek-V3 256 → 128 over 65,536 tokens: 0.4 s on an H200 (RESULTS.md).
"""

from __future__ import annotations

import warnings
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
    """Every kept expert's trial (keep − {e}) for tokens ``tok`` [P]. The incremental path above (``_fast_rows``)
    takes every token it can; the rest — fewer than k+1 kept experts in its chosen groups, a route outside its
    candidate list, a group switch with too few experts — and all with ``fast=False`` (the reference the fast
    path is tested against) route every affected (token, trial) pair in full with ``mop_ray.arch.route``."""
    if not fast:
        err, delta = _full_rows(prods, tok, keep)
        return TokenTrials(err, delta, torch.ones_like(delta, dtype=torch.bool))
    err, delta, watch, bad = _fast_rows(prods, tok, keep)
    _mend(prods, tok, keep, err, delta, watch, bad)
    return TokenTrials(err, delta, watch)


def _mend(prods, tok, keep, err, delta, watch, bad) -> None:
    """Rows the fast path could not score (``bad`` [P]) scored again in full, in place; they watch everything."""
    sel = bad.nonzero()[:, 0]  # one host sync
    if sel.shape[0]:
        err[sel], delta[sel] = _full_rows(prods, tok[sel], keep)
        watch[sel] = True


def _scores(prods: ExpertProducts, tok: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Gate scores [P, E] under the kept set: softmax over the kept rows, or sigmoid."""
    logits = prods.logits[tok]
    return logits.masked_fill(~keep, NEG).softmax(-1) if prods.spec.scoring == "softmax" else logits.sigmoid()


def _dense_base(prods, tok, scores, cross, quad) -> torch.Tensor:
    """Errors [P, E] of unchanged routes when e leaves a softmax without renormalisation: weights × 1/(1 − p_e)."""
    s = 1 / (1 - scores.double()).clamp_min(1e-300)
    return (prods.yy[tok, None] - 2 * s * cross[:, None] + s * s * quad[:, None]).clamp_min(0)


_DROPS: dict = {}


def _drops(k: int, device) -> torch.Tensor:
    """[k+1, k] positions into a token's next k+1 experts: row j < k leaves out the j-th (its route once that
    expert is removed), row k is the first k (its route now)."""
    key = (k, device)
    if key not in _DROPS:
        rows = [[i for i in range(k + 1) if i != j] for j in range(k)] + [list(range(k))]
        _DROPS[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return _DROPS[key]


def _fast_rows(prods, tok, keep):
    """(err [P], delta [P, E], watch [P, E], bad [P]) for tokens ``tok`` [P] with fixed shapes and no host sync
    (so a CUDA graph can hold it); ``bad`` rows are not valid and go to ``_mend``."""
    spec = prods.spec
    n_tokens, n_experts, k, dev = tok.shape[0], prods.logits.shape[1], spec.top_k, tok.device
    nxt, ok, groups = route_rows(prods, tok, keep, k + 1)  # [P, k+1]
    bad = ~ok
    at = nxt.clamp_min(0)  # rows without k+1 experts hold -1: gathered anywhere, marked bad
    spare = lambda t: torch.where(t >= 0, t, n_experts).flatten(1)  # noqa: E731 -1 → a spare column
    scores = _scores(prods, tok, keep)  # [P, E]
    # every routed expert's trial and the current route at once, as k+1 routes per token: [P, k+1, k]
    drops = _drops(k, dev)
    ids = at[:, drops]  # [P, k+1, k]
    s = scores.gather(1, at)[:, drops]  # [P, k+1, k]
    if spec.scoring == "softmax":  # softmax over the kept rows without the dropped expert
        s[:, :k] /= (1 - scores.gather(1, at[:, :k]))[..., None]
    cross, quad, outside = prods.pair_parts_at(tok.repeat_interleave(k + 1), ids.view(-1, k), gates(spec, s).view(-1, k))
    cross, quad = cross.view(n_tokens, k + 1), quad.view(n_tokens, k + 1)
    bad |= outside.view(n_tokens, k + 1).any(-1)
    errs = (prods.yy[tok, None] - 2 * cross + quad).clamp_min(0)  # [P, k+1]
    err = errs[:, k]  # [P] under the kept set
    watch = torch.zeros(n_tokens, n_experts + 1, dtype=torch.bool, device=dev).scatter_(1, spare(nxt), True)
    if _dense(spec):  # every trial changes every token's weights
        delta = _dense_base(prods, tok, scores, cross[:, k], quad[:, k]) - err[:, None]
        delta = torch.cat([delta.masked_fill(~keep, 0), delta[:, :1]], 1)  # [P, E+1]
        watch[:] = True
    else:
        delta = torch.zeros(n_tokens, n_experts + 1, dtype=torch.float64, device=dev)
    # routed experts: drop e, the (k+1)-th expert moves up (a pair that may switch groups is overwritten below)
    delta.scatter_(1, spare(nxt[:, :k]), errs[:, :k] - err[:, None])
    if groups is not None:
        _switch_rows(prods, tok, keep, groups, scores, err, delta, watch, bad)
    return err, delta[:, :n_experts], watch[:, :n_experts], bad


def _switch_rows(prods, tok, keep, groups, scores, err, delta, watch, bad) -> None:
    """Group routing: the trials that may switch a token's groups — e among the experts that set a chosen
    group's score, whose score without e falls to the best unchosen group's — routed again in full over fixed
    slots (the chosen groups' top m, [P, tg·m]); ``delta``, ``watch`` [P, E+1] and ``bad`` updated in place."""
    spec = prods.spec
    n_tokens, n_experts, k, dev = tok.shape[0], prods.logits.shape[1], spec.top_k, tok.device
    gids, v, chosen, runner_up = groups  # [P, G, m+1] ids and values, [P, G] bool, [P]
    m = gids.shape[-1] - 1
    # the group's score without its j-th best expert (j < m): the next one moves up
    without = v[..., 1:2] if m == 1 else torch.stack([v[..., 1] + v[..., 2], v[..., 0] + v[..., 2]], -1)
    flips = (without <= runner_up[:, None, None]) & chosen[..., None] & (gids[..., :m] >= 0)  # [P, G, m]
    # what the routes depend on besides nxt: the scores and next experts of the chosen groups, and for a token
    # that may switch, the score of the best unchosen group(s) (ties included)
    score = v[..., 0] if m == 1 else v[..., 0] + v[..., 1]  # [P, G]
    runner = ~chosen & (score == runner_up[:, None]) & flips.flatten(1).any(-1)[:, None]  # [P, G]
    both = torch.cat([gids.masked_fill(~chosen[..., None], -1), gids[..., :m].masked_fill(~runner[..., None], -1)], -1)
    watch.scatter_(1, torch.where(both >= 0, both, n_experts).flatten(1), True)
    # slots: the chosen groups' top m experts ([P, tg] groups; only they can flip)
    cg = chosen.float().topk(spec.topk_group, dim=-1, sorted=False).indices  # [P, tg]
    slot_e = gids[..., :m].gather(1, cg[..., None].expand(-1, -1, m)).flatten(1)  # [P, S]
    slot_f = flips.gather(1, cg[..., None].expand(-1, -1, m)).flatten(1)  # [P, S]
    n_slots = slot_e.shape[1]
    rows = torch.arange(n_tokens * n_slots, device=dev)
    t = tok.repeat_interleave(n_slots)  # [P·S]
    e = torch.where(slot_f, slot_e, n_experts).flatten()  # [P·S] the removed expert, or the spare column
    trial = torch.cat([keep, keep.new_zeros(1)]).expand(t.shape[0], -1).clone()  # [P·S, E+1]
    trial.scatter_(1, e[:, None], False)
    i2, ok2, _ = route_rows(prods, t, trial[:, :n_experts], k)  # [P·S, k]
    i2c = i2.clamp_min(0)
    p = rows // n_slots  # [P·S] row in this block
    s = scores[p[:, None], i2c]  # [P·S, k]
    if spec.scoring == "softmax":
        s = s / (1 - scores[p, e.clamp_max(n_experts - 1)])[:, None]
    cross, quad, outside = prods.pair_parts_at(t, i2c, gates(spec, s))
    pe = (prods.yy[t] - 2 * cross + quad).clamp_min(0)  # [P·S]
    delta.scatter_(1, e.view(n_tokens, n_slots), (pe - err[p]).view(n_tokens, n_slots))  # non-flips: spare
    # the new routes: the rest of their groups come after these
    watch.scatter_(1, torch.where(slot_f.flatten()[:, None], i2c, n_experts).view(n_tokens, -1), True)
    bad |= (slot_f.flatten() & (~ok2 | outside)).view(n_tokens, n_slots).any(-1)


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
        base = _dense_base(prods, tok, _scores(prods, tok, keep), cross, quad)
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


CHUNK = 8192  # tokens scored per call: bounds the re-routed slots' temporaries ([CHUNK·tg·m, E] ids)


class _StepGraphs:
    """``_fast_rows`` captured as CUDA graphs, one per power-of-two token count up to CHUNK (padded with a
    repeated token): a greedy step is a few hundred small kernels over a few thousand tokens, so launching them
    one by one costs ~10× their GPU time. Graphs share one memory pool; every replay's outputs are copied out
    before the next replay."""

    def __init__(self, prods: ExpertProducts, keep: torch.Tensor):
        self.prods, self.keep = prods, keep  # ``keep`` is updated in place between replays
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}

    def __call__(self, tok: torch.Tensor):
        size = max(256, 1 << (tok.shape[0] - 1).bit_length())
        if size not in self.graphs:
            self.graphs[size] = self._capture(size, tok[:1])
        graph, buf, outs = self.graphs[size]
        buf[:tok.shape[0]] = tok
        buf[tok.shape[0]:] = tok[0]
        graph.replay()
        return [o[:tok.shape[0]].clone() for o in outs]

    def _capture(self, size: int, pad: torch.Tensor):
        buf = pad.expand(size).clone()
        side = torch.cuda.Stream(buf.device)
        side.wait_stream(torch.cuda.current_stream(buf.device))
        with torch.cuda.stream(side):  # warm-up: cuBLAS handles, cached constants, ``orders`` outside the pool
            _fast_rows(self.prods, buf, self.keep)
        torch.cuda.current_stream(buf.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a stage captures in its selection thread while its observe thread runs (and allocates)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outs = _fast_rows(self.prods, buf, self.keep)
        return graph, buf, outs


class TrialTable:
    """Every token's trial rows under the current kept set, rescored only where a removal reaches them."""

    def __init__(self, prods: ExpertProducts, batch: torch.Tensor, keep: torch.Tensor,
                 n_batches: int | None = None, fast: bool = True):
        self.prods, self.keep, self.fast = prods, keep.clone(), fast
        n_batches = int(batch.max()) + 1 if n_batches is None else n_batches
        dev = prods.logits.device
        self.onehot = torch.zeros(n_batches, batch.shape[0], dtype=torch.float64, device=dev)  # [B, N]
        self.onehot[batch, torch.arange(batch.shape[0], device=dev)] = 1
        n_tokens, n_experts = prods.logits.shape
        self.err = torch.empty(n_tokens, dtype=torch.float64, device=dev)  # [N]
        self.delta = torch.empty(n_tokens, n_experts, dtype=torch.float64, device=dev)  # [N, E]
        self.watch = torch.empty(n_tokens, n_experts, dtype=torch.bool, device=dev)  # [N, E]
        self.graphs = _StepGraphs(prods, self.keep) if dev.type == "cuda" and fast else None
        self._score(torch.arange(n_tokens, device=dev), graphs=False)
        self.rescored = 0  # token rows scored again after removals

    def _score(self, tok: torch.Tensor, graphs: bool = True) -> None:
        for start in range(0, tok.shape[0], CHUNK):
            t = tok[start:start + CHUNK]
            rows = self._graphed(t) if graphs and self.graphs is not None else None  # graphs only when fast
            if rows is None:
                rows = token_trials(self.prods, t, self.keep, self.fast)
                err, delta, watch = rows.err, rows.delta, rows.watch
            else:
                err, delta, watch, bad = rows
                _mend(self.prods, t, self.keep, err, delta, watch, bad)
            self.err[t], self.delta[t], self.watch[t] = err, delta, watch

    def _graphed(self, tok: torch.Tensor):
        """``_fast_rows`` through the step graphs; None (and eager from then on) if this torch cannot capture it."""
        try:
            return self.graphs(tok)
        except RuntimeError as e:  # a capture this torch/driver refuses: the same rows, launched one by one
            warnings.warn(f"greedy: CUDA graph capture failed, scoring steps eagerly ({str(e).splitlines()[0]})")
            self.graphs = None
            return None

    def remove(self, e: int) -> None:
        self.keep[e] = False
        tok = self.watch[:, e].nonzero()[:, 0]  # [P]
        self._score(tok)
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
                  "candidates": prods.n_candidates, "rebuilt_tokens": prods.refreshed, "rebuilds": prods.refreshes, "direct_pairs": prods.direct,
                  "rescored_tokens": table.rescored, "step_graphs": len(table.graphs.graphs) if table.graphs else 0}

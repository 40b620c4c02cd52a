"""Fast reconstruction-loss scoring: every expert runs ONCE on the sampled tokens, then any expert subset is scored
from per-token inner products, never by re-running a masked MoE forward per subset.

For token t with MoE input x, original output z and shared-expert term s (0 when the family has none), the
layer pruned to a kept set S outputs  ŷ = Σ_{j∈top-k_S(t)} w_j f_j(x) + s, so with y = z − s:

    ‖z − ŷ‖² = ‖y‖² − 2 Σ_j w_j ⟨y, f_j⟩ + Σ_{j,l} w_j w_l ⟨f_j, f_l⟩.

``ExpertProducts`` holds ‖y‖² [N], ⟨y, f_e⟩ and ‖f_e‖² for every expert [N, E], and the Gram ⟨f_j, f_l⟩ over
each token's candidate experts [N, c, c]: the c experts it ranks highest (router choice score). When every
expert fits (few experts, or plain top-k routing where at most E − min_kept can be removed) c is exact;
otherwise (256 routed experts, group-limited routing, where a removal can switch the token's groups) c is
capped (``max_candidates``) and a route that leaves the list is handled exactly: the token's list is rebuilt
from the experts still kept (its experts re-run once), and a route still outside it is scored from the
re-run outputs directly. Routing for S comes from the recorded router logits with dropped experts masked
(``mop_ray.arch.route``), which equals the physically pruned router.
Per-token inner products are float64 for float32 weights and float32 (fp32-accumulated GEMMs) for bf16/fp16
weights, whose expert outputs carry ~3 significant digits anyway; every sum over tokens and batches is float64.
For layers of at most ``RECORD_UP_TO`` experts the observer, which runs every expert on every token anyway,
records each sampled row's Gram with y (``row_products``), and ``recorded_products`` builds the same products
from the records without running an expert again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mop_ray.arch import RouterSpec, route
from mop_ray.arch.experts import expert_forward

DEFAULT_MAX_CANDIDATES = 64
RECORD_UP_TO = 16  # experts: up to this many, each sampled row carries its Gram (the observer has the outputs)


class ExpertRunner:
    """Re-runs every expert of one MoE block on chosen sampled tokens: (f [m, E, H] in ``store``, y [m, H] in ``prec``)."""

    def __init__(self, moe, family, x: torch.Tensor, z: torch.Tensor, prec: torch.dtype):
        self.moe, self.family, self.x, self.z, self.prec = moe, family, x, z, prec
        self.n_experts = moe.experts.gate_up_proj.shape[0]
        self.dtype = moe.experts.gate_up_proj.dtype
        self.store = product_dtypes(self.dtype, x.device)[1]

    def chunk_tokens(self) -> int:
        """Tokens per chunk so that one chunk's expert outputs [n, E, H] stay within a memory budget."""
        budget = 2 << 30
        if self.x.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.x.device)
            budget = max(budget, min(16 << 30, free // 5))
        width = (self.n_experts + 16) * self.x.shape[-1] * torch.finfo(self.store).bits // 8
        return max(1, budget // width)

    def __call__(self, tokens: torch.Tensor | slice, append_y: bool = False,
                 experts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``append_y``: rows E and E+1 of f [m, E+pad, H] sum to y (its half-precision high and low parts, or y
        and 0) and the rest are 0, so one Gram of f holds ⟨f_i, f_j⟩, ⟨y, f_e⟩ and ‖f_e‖² together.
        ``experts``: run only these (f [m, len(experts), H], in that order)."""
        xs = self.x[tokens].to(dtype=self.dtype)  # [m, H]
        shared = self.family.shared_output(self.moe, xs)
        y = self.z[tokens].to(self.prec) - (shared.to(self.prec) if shared is not None else 0)  # [m, H]
        ids = list(range(self.n_experts)) if experts is None else experts
        n = len(ids)
        f = torch.empty(xs.shape[0], gram_rows(n) if append_y else n, xs.shape[1], dtype=self.store, device=xs.device)
        for j, e in enumerate(ids):  # f [m, E(+pad), H]
            f[:, j] = expert_forward(self.moe.experts, xs, e)
        if append_y:
            _append_y(f, n, y)
        return f, y


def product_dtypes(weight_dtype: torch.dtype, device) -> tuple[torch.dtype, torch.dtype]:
    """(prec, store) of the per-token products: float64 products for float32 weights, float32 for half ones; on
    CUDA, half expert outputs stay in their dtype (that is all the information they hold) and products accumulate
    in float32 (bmm out_dtype); elsewhere they are upcast to ``prec`` first."""
    prec = torch.float64 if weight_dtype in (torch.float32, torch.float64) else torch.float32
    half = weight_dtype in (torch.bfloat16, torch.float16)
    return prec, weight_dtype if torch.device(device).type == "cuda" and half else prec


def gram_dtype(store: torch.dtype) -> torch.dtype:
    """The dtype per-token Grams of ``store`` outputs come out in: float64 for float64, else float32 (``bmm32``)."""
    return torch.float64 if store == torch.float64 else torch.float32


def gram_rows(n_experts: int) -> int:
    """Rows of f for a Gram with y appended: E experts + y's two parts, padded to a multiple of 16 (tensor cores)."""
    return -(-(n_experts + 2) // 16) * 16


def _append_y(f: torch.Tensor, n: int, y: torch.Tensor) -> None:
    """Rows n and n+1 of f [m, rows, H] := y's parts in f's dtype (y = hi + lo, to ~2^-16 relative in half), rest 0."""
    f[:, n] = y  # rounded to f's dtype
    f[:, n + 1] = y - f[:, n].to(y.dtype)  # the rounding error
    f[:, n + 2:] = 0


def row_products(outputs: list[torch.Tensor], y: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """Per token, the Gram of its expert outputs f_e [m, H] (in order) and of y = z − s [m, H]: [m, E+2, E+2]
    (rows/columns E, E+1: y's two parts), float32 or better — what ``expert_products`` reduces, for rows whose
    expert outputs are already computed (the observer records it with the sample when E ≤ ``RECORD_UP_TO``)."""
    n, (m, h) = len(outputs), y.shape
    rows = gram_rows(n)
    g = torch.empty(m, n + 2, n + 2, dtype=gram_dtype(store), device=y.device)
    step = max(1, (256 << 20) // (rows * h * torch.finfo(store).bits // 8))  # f of ≤ 256 MiB at a time
    for a in range(0, m, step):
        f = torch.empty(min(step, m - a), rows, h, dtype=store, device=y.device)  # [m', E+pad, H]
        for j, fe in enumerate(outputs):
            f[:, j] = fe[a:a + step]
        _append_y(f, n, y[a:a + step])
        g[a:a + step] = bmm32(f, f.transpose(1, 2))[:, :n + 2, :n + 2]
    return g


def bmm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b batched, accumulated and returned in float32 or better (half inputs: cuBLAS out_dtype)."""
    if a.dtype in (torch.bfloat16, torch.float16):
        if a.device.type == "cuda":
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a.float(), b.float())  # out_dtype is CUDA-only
    return torch.bmm(a, b)


@dataclass
class ExpertProducts:
    yy: torch.Tensor  # [N] ‖y‖², float64
    yf: torch.Tensor  # [N, E] ⟨y, f_e⟩, float64
    ff: torch.Tensor  # [N, E] ‖f_e‖², float64
    cand: torch.Tensor  # [N, c] candidate expert ids per token (long)
    pos: torch.Tensor  # [N, E] position of expert e in cand[t], -1 if absent (long)
    gram: torch.Tensor  # [N, c, c] ⟨f_j, f_l⟩ over cand[t] (prec)
    logits: torch.Tensor  # [N, E] float32 router logits
    choice: torch.Tensor  # [N, E] float32 router choice scores (the order top-k picks in)
    bias: torch.Tensor | None  # [E] e_score_correction_bias (DeepSeek-V3)
    spec: RouterSpec
    runner: ExpertRunner | None = None  # re-runs experts for routes outside the candidate lists
    refreshed: int = 0  # tokens whose candidate list was rebuilt
    refreshes: int = 0  # rebuilds (each re-runs the kept experts on its tokens)
    direct: int = 0  # (set, token) pairs scored from re-run outputs
    _orders: tuple | None = None

    def orders(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's experts by router choice, best first [N, E]; the same within each routing group
        [N, G, E/G] (expert ids); and values whose per-group sums rank groups as the router does [N, E]."""
        if self._orders is None:
            n_tokens, n_experts = self.logits.shape
            order = self.choice.argsort(dim=-1, descending=True, stable=True)  # [N, E]
            g = self.spec.n_group if self.spec.group_score is not None else 1
            size = n_experts // g
            within = self.choice.view(n_tokens, g, size).argsort(dim=-1, descending=True, stable=True)
            gorder = within + torch.arange(g, device=order.device)[None, :, None] * size  # [N, G, S]
            # softmax gates: exp(l − max) ranks group sums like the kept-softmax does (same Z per token)
            values = self.choice if self.spec.scoring == "sigmoid" else (self.logits - self.logits.amax(-1, keepdim=True)).exp()
            self._orders = (order, gorder, values)
        return self._orders

    @property
    def n_tokens(self) -> int:
        return self.yy.shape[0]

    @property
    def n_candidates(self) -> int:
        return self.cand.shape[1]

    def token_errors(self, keep: torch.Tensor) -> torch.Tensor:
        """‖z − ŷ_S‖² per token [N] (float64) for the kept mask ``keep`` [E] bool."""
        idx, w = route(self.spec, self.logits, self.bias, keep=keep)  # [N, k]
        return self.pair_errors(torch.arange(self.n_tokens, device=idx.device), idx, w, keep)

    def pair_errors(self, tok: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """‖z − ŷ‖² [P] (float64) of token tok[p] routed to idx[p] [P, k] with gate weights w[p] [P, k]."""
        cross, quad = self.pair_parts(tok, idx, w, keep)
        return (self.yy[tok] - 2 * cross + quad).clamp_min(0)

    def pair_parts(self, tok: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                   keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_j w_j ⟨y, f_j⟩ and Σ_{j,l} w_j w_l ⟨f_j, f_l⟩ [P] (float64) of the routes idx [P, k], w [P, k].

        ``keep`` [E] is a superset of every kept set the routes came from: a token whose route leaves its
        candidate list gets a new list drawn from these experts.
        """
        cross, quad, outside = self.pair_parts_at(tok, idx, w)
        if bool(outside.any()):
            self._refresh(tok[outside].unique(), keep)
            cross, quad, outside = self.pair_parts_at(tok, idx, w)
        if bool(outside.any()):  # still outside after a rebuild (group switches): products of re-run outputs
            sel = outside.nonzero()[:, 0]
            quad[sel] = self._direct_quad(tok[sel], idx[sel], w[sel].double())
        return cross, quad

    def pair_parts_at(self, tok: torch.Tensor, idx: torch.Tensor,
                      w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pair_parts`` from the candidate lists as they are, with no host sync: cross, quad [P] and whether
        the route leaves the token's list [P] bool (its quad is then not valid)."""
        w = w.double()
        p = self.pos[tok[:, None], idx]  # [P, k] positions in cand
        outside = ((p < 0) & (w > 0)).any(-1)  # [P]
        p = p.clamp_min(0)  # zero-weight slots (fewer kept experts than k) may point anywhere
        g = self.gram[tok[:, None, None], p[:, :, None], p[:, None, :]].double()  # [P, k, k]
        cross = (w * self.yf[tok[:, None], idx]).sum(-1)  # [P]
        quad = torch.einsum("pj,pjl,pl->p", w, g, w)  # [P]
        return cross, quad, outside

    def _refresh(self, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """Rebuild the candidate lists of ``tokens`` [m] from the experts in ``keep``, re-running those experts."""
        if self.runner is None:
            raise RuntimeError("internal: a route left the candidate list and no expert runner is attached")
        c = self.n_candidates
        kept = keep.nonzero()[:, 0]  # [U] the experts a new list can hold: only they re-run
        slot = torch.full((keep.shape[0],), -1, dtype=torch.long, device=keep.device)
        slot[kept] = torch.arange(kept.shape[0], device=keep.device)  # expert id -> row of f
        step = self.runner.chunk_tokens()
        for start in range(0, tokens.shape[0], step):
            t = tokens[start:start + step]
            cand = self.choice[t].masked_fill(~keep, float("-inf")).topk(c, dim=-1).indices  # [m, c]
            f, _ = self.runner(t, experts=kept.tolist())  # [m, U, H]
            fc = f.gather(1, slot[cand][:, :, None].clamp_min(0).expand(-1, -1, f.shape[-1]))  # [m, c, H]
            self.gram[t] = bmm32(fc, fc.transpose(1, 2)).to(self.gram.dtype)
            self.pos[t] = -1
            at = torch.arange(c, device=t.device).expand(t.shape[0], -1)
            self.pos[t[:, None], cand] = torch.where(slot[cand] >= 0, at, -1)  # fewer than c kept: the rest absent
            self.cand[t] = cand
        self.refreshed += int(tokens.shape[0])
        self.refreshes += 1

    def _direct_quad(self, tok: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_{j,l} w_j w_l ⟨f_j, f_l⟩ [P] from re-run expert outputs."""
        out = torch.empty(tok.shape[0], dtype=torch.float64, device=tok.device)
        step = self.runner.chunk_tokens()
        for start in range(0, tok.shape[0], step):
            sl = slice(start, start + step)
            f, _ = self.runner(tok[sl])  # [m, E, H]
            fk = f.gather(1, idx[sl, :, None].expand(-1, -1, f.shape[-1])).double()  # [m, k, H]
            out[sl] = torch.einsum("pj,pjh->ph", w[sl], fk).pow(2).sum(-1)
        self.direct += int(tok.shape[0])
        return out

    def single_expert_errors(self, weight: torch.Tensor) -> torch.Tensor:
        """‖z − (c_e f_e + s)‖² per token and expert [N, E] for single-expert gate weights ``weight`` [N, E]."""
        weight = weight.double()
        return (self.yy[:, None] - 2 * weight * self.yf + weight.pow(2) * self.ff).clamp_min(0)


def candidate_count(spec: RouterSpec, n_experts: int, min_kept: int, max_candidates: int | None = None) -> int:
    """Candidate experts per token: every expert that can still be routed to once at least ``min_kept`` are kept
    (all of them under group routing, where a removal can change the chosen groups), capped at
    ``max_candidates`` (default: none up to 32 experts, else ``DEFAULT_MAX_CANDIDATES``)."""
    grouped = spec.group_score is not None and spec.n_group > 1
    exact = n_experts if grouped else min(n_experts, spec.top_k + (n_experts - min_kept))
    if max_candidates is None:
        max_candidates = n_experts if n_experts <= 32 else DEFAULT_MAX_CANDIDATES
    return min(exact, max(max_candidates, spec.top_k))


def choice_scores(spec: RouterSpec, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[N, E] scores whose order the router's top-k follows (softmax is monotone in the logits)."""
    if spec.scoring == "sigmoid":
        return logits.sigmoid() + bias if bias is not None else logits.sigmoid()
    return logits


def selection_bytes(n_tokens: int, n_experts: int, hidden: int, c: int, half_weights: bool,
                    recorded: bool = False) -> int:
    """Device bytes the products of one layer's sample take beside the layer: the Gram [N, c, c], the [N, E]
    tables (products, candidate positions, router orders, and greedy's trial table: float64 changes and a bool
    watch mask) and the sample's x and z [N, H] in float32 — or, ``recorded`` (the observer's Grams, no expert
    runs: ``recorded_products``), x and the uploaded Grams [N, E+2, E+2] instead of z."""
    gram = n_tokens * c * c * (4 if half_weights else 8)
    x = n_tokens * hidden * 4
    z_or_grams = n_tokens * (n_experts + 2) ** 2 * 8 if recorded else n_tokens * hidden * 4
    return gram + 7 * n_tokens * n_experts * 8 + n_tokens * n_experts + x + z_or_grams


def layer_selection_bytes(ckpt, n_tokens: int, half_weights: bool) -> int:
    """``selection_bytes`` of one MoE layer of ``ckpt`` (a Checkpoint) for a sample of ``n_tokens`` rows."""
    from mop_ray.observe.records import records_products

    c = candidate_count(ckpt.family.router_spec(ckpt.config), ckpt.num_experts, 1)
    return selection_bytes(n_tokens, ckpt.num_experts, int(ckpt.config["hidden_size"]), c, half_weights,
                           recorded=records_products(ckpt.num_experts))


def _candidates(spec: RouterSpec, logits: torch.Tensor, bias: torch.Tensor | None, c: int):
    """(choice [N, E], cand [N, c] each token's c best experts by router choice, pos [N, E] their positions, -1 else)."""
    n_tokens, n_experts = logits.shape
    device = logits.device
    choice = choice_scores(spec, logits, bias)  # [N, E]
    cand = choice.topk(c, dim=-1).indices if c < n_experts else torch.arange(n_experts, device=device).expand(n_tokens, -1)
    cand = cand.contiguous()  # [N, c]
    pos = torch.full((n_tokens, n_experts), -1, dtype=torch.long, device=device)
    pos.scatter_(1, cand, torch.arange(c, device=device).expand(n_tokens, -1).contiguous())
    return choice, cand, pos


def _reduce(g: torch.Tensor, n_experts: int, cand: torch.Tensor, c: int):
    """From per-token Grams g [n, ≥E+2, ≥E+2] with y's parts at E, E+1: ⟨y, f_e⟩, ‖f_e‖² [n, E] float64 and the
    Gram over each token's candidates cand [n, c] -> [n, c, c]."""
    yf = (g[:, n_experts, :n_experts] + g[:, n_experts + 1, :n_experts]).double()  # [n, E]
    ff = g[:, :n_experts, :n_experts].diagonal(dim1=1, dim2=2).double()  # [n, E]
    if c < n_experts:
        g = g.gather(1, cand[:, :, None].expand(-1, -1, g.shape[2])).gather(2, cand[:, None, :].expand(-1, c, -1))
    return yf, ff, g[:, :c, :c]


@torch.no_grad()
def expert_products(moe, family, spec: RouterSpec, x: torch.Tensor, z: torch.Tensor, logits: torch.Tensor,
                    min_kept: int, max_candidates: int | None = None) -> ExpertProducts:
    """Run every expert once over x [N, H] (in token chunks) and reduce to the products above."""
    n_tokens, n_experts = logits.shape
    device = x.device
    c = candidate_count(spec, n_experts, min_kept, max_candidates)
    bias = getattr(moe.gate, "e_score_correction_bias", None)
    bias = bias.float() if bias is not None else None
    logits = logits.float().to(device)
    choice, cand, pos = _candidates(spec, logits, bias, c)
    prec = product_dtypes(moe.experts.gate_up_proj.dtype, device)[0]
    runner = ExpertRunner(moe, family, x, z, prec)
    yy = torch.empty(n_tokens, dtype=torch.float64, device=device)
    yf = torch.empty(n_tokens, n_experts, dtype=torch.float64, device=device)
    ff = torch.empty(n_tokens, n_experts, dtype=torch.float64, device=device)
    gram = torch.empty(n_tokens, c, c, dtype=prec, device=device)
    step = runner.chunk_tokens()
    for start in range(0, n_tokens, step):
        sl = slice(start, min(start + step, n_tokens))
        f, y = runner(sl, append_y=True)  # [n, E+pad, H], [n, H]
        g = bmm32(f, f.transpose(1, 2))  # [n, E+pad, E+pad]: one compute-bound pass over the outputs
        del f
        yy[sl] = y.pow(2).sum(-1).double()
        yf[sl], ff[sl], gram[sl] = _reduce(g, n_experts, cand[sl], c)
        del g
    return ExpertProducts(yy, yf, ff, cand, pos, gram, logits, choice, bias, spec, runner)


def recorded_products(moe, spec: RouterSpec, g: torch.Tensor, yy: torch.Tensor, logits: torch.Tensor,
                      min_kept: int) -> ExpertProducts:
    """``expert_products`` from the Grams the observer recorded with the sample (g [N, E+2, E+2], ‖y‖² yy [N]):
    no expert runs again. Only where every candidate list is exact (no expert runner to rebuild one)."""
    n_tokens, n_experts = logits.shape
    c = candidate_count(spec, n_experts, min_kept)
    if c != candidate_count(spec, n_experts, min_kept, n_experts):
        raise ValueError(f"recorded products need exact candidate lists; {c} candidates of {n_experts} are capped")
    bias = getattr(moe.gate, "e_score_correction_bias", None)
    bias = bias.float() if bias is not None else None
    logits = logits.float().to(g.device)
    choice, cand, pos = _candidates(spec, logits, bias, c)
    yf, ff, gram = _reduce(g, n_experts, cand, c)
    return ExpertProducts(yy.double(), yf, ff, cand, pos, gram.contiguous(), logits, choice, bias, spec)

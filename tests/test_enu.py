"""enu's fast scorer against the literal procedure: physically pruned MoE blocks run forward on every subset."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.methods import LayerContext, choose, get_method
from mop_ray.methods.enu import candidate_sets, layer_products, search, set_loss
from mop_ray.observe.records import LayerRecords


@pytest.fixture
def records(records_with_outputs):
    """Records whose sampled rows keep their outputs z: these tests score sets against z as recorded."""
    return records_with_outputs


@torch.no_grad()
def pruned_block(moe, kept):
    """The MoE block as the pruned checkpoint has it: kept experts and router rows only."""
    b = copy.deepcopy(moe)
    k = torch.tensor(sorted(kept))
    b.experts.gate_up_proj = torch.nn.Parameter(b.experts.gate_up_proj[k].clone())
    b.experts.down_proj = torch.nn.Parameter(b.experts.down_proj[k].clone())
    b.experts.num_experts = len(k)
    b.gate.weight = torch.nn.Parameter(b.gate.weight[k].clone())
    b.gate.num_experts = len(k)
    if getattr(b.gate, "e_score_correction_bias", None) is not None:
        b.gate.e_score_correction_bias = b.gate.e_score_correction_bias[k].clone()
    return b


@torch.no_grad()
def masked_loss(moe, spec, x, z, batch, kept):
    """The masked MoE forward: dropped router logits at -inf, each routed expert run on its tokens."""
    from mop_ray.arch import route
    from mop_ray.arch.experts import expert_forward

    keep = torch.zeros(moe.gate.weight.shape[0], dtype=torch.bool)
    keep[list(kept)] = True
    logits = torch.nn.functional.linear(x, moe.gate.weight)
    idx, w = route(spec, logits, getattr(moe.gate, "e_score_correction_bias", None), keep=keep)
    out = torch.zeros_like(x)
    for e in kept:
        tok, slot = torch.where(idx == e)
        out.index_add_(0, tok, w[tok, slot, None] * expert_forward(moe.experts, x[tok], e))
    shared = moe.shared_experts(x) if hasattr(moe, "shared_experts") else None
    if hasattr(moe, "shared_expert"):
        shared = torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    out = out + (shared if shared is not None else 0)
    per = torch.zeros(int(batch.max()) + 1, dtype=torch.float64).index_add_(0, batch, (z.double() - out.double()).pow(2).sum(-1))
    return float(per.sqrt().sum())


@torch.no_grad()
def literal_loss(moe, x, z, batch, kept):
    out = pruned_block(moe, kept)(x[None])[0].double()  # [N, H]
    diff = (z.double() - out).pow(2).sum(-1)
    per = torch.zeros(int(batch.max()) + 1, dtype=torch.float64).index_add_(0, batch, diff)
    return float(per.sqrt().sum())


def setup(family, tiny_models, records):
    ckpt = Checkpoint(tiny_models[family])
    layer = ckpt.moe_layers[-1]
    groups = (ckpt.family.group_constraints(ckpt.config) or (1,))[0]
    ctx = LayerContext(layer, ckpt.num_experts, ckpt.top_k, groups, model_dir=str(ckpt.path),
                       records=LayerRecords(records(family), layer))
    prods, batch, (moe, _, sample) = layer_products(ctx, min_kept=2)
    x, z = sample.tensor("x"), sample.tensor("z")
    return ctx, prods, batch, moe, x, z


def test_fast_losses_equal_masked_forward_losses(tiny_models, records, family):
    ctx, prods, batch, moe, x, z = setup(family, tiny_models, records)
    r = 4
    sets = list(candidate_sets(8, r, ctx.groups))
    assert len(sets) == (36 if ctx.groups == 2 else 70)
    fast = [set_loss(prods, batch, torch.isin(torch.arange(8), torch.tensor(s))) for s in sets]
    slow = [literal_loss(moe, x, z, batch, s) for s in sets]
    masked = [masked_loss(moe, prods.spec, x, z, batch, s) for s in sets[:5]]
    assert masked == pytest.approx(slow[:5], rel=1e-6)
    for f, s in zip(fast, slow):
        assert f == pytest.approx(s, rel=1e-6, abs=1e-9)
    kept, details = search(prods, batch, 8, r, ctx.groups)
    best = min(range(len(sets)), key=lambda i: (slow[i], sets[i]))
    assert kept == list(sets[best]) and details["mode"] == "exhaustive"
    # the unpruned set reproduces the original output
    assert set_loss(prods, batch, torch.ones(8, dtype=torch.bool)) == pytest.approx(0, abs=1e-5)


def test_the_observers_recorded_products_equal_running_the_experts_again(tiny_models, records, family, monkeypatch):
    """Layers of few experts carry each sampled row's Gram in the records (the observer has every expert's output
    anyway); selection takes them instead of running the experts on the sample again — and gets the products
    that running them again gives."""
    from mop_ray.arch import experts as experts_mod
    from mop_ray.methods.products import expert_products

    ckpt = Checkpoint(tiny_models[family])
    ctx = LayerContext(ckpt.moe_layers[-1], ckpt.num_experts, ckpt.top_k, 1, model_dir=str(ckpt.path),
                       records=LayerRecords(records(family), ckpt.moe_layers[-1]))
    sample = ctx.records.sample
    assert sample.has_products and sample.table["gram"].type.list_size == (ckpt.num_experts + 2) ** 2
    with monkeypatch.context() as m:  # no expert runs for the recorded products
        m.setattr(experts_mod.torch.nn.functional, "linear", None)
        recorded, _, (moe, _, _) = layer_products(ctx, min_kept=2)
    assert recorded.runner is None
    again = expert_products(moe, ckpt.family, recorded.spec, sample.tensor("x"), sample.tensor("z"),
                            sample.tensor("logits"), min_kept=2)
    for name in ("cand", "pos"):
        assert torch.equal(getattr(recorded, name), getattr(again, name)), name
    # an inner product's rounding error scales with its Cauchy–Schwarz bound |u||v|, not with its value (on a GPU
    # the observer's all-experts kernels and a per-expert re-run round differently; on the CPU they agree exactly)
    yy, ff, gd = again.yy, again.ff, again.gram.diagonal(dim1=1, dim2=2)
    bounds = {"yy": yy, "ff": ff, "yf": (yy[:, None] * ff).sqrt(), "gram": (gd[:, :, None] * gd[:, None, :]).sqrt()}
    for name, bound in bounds.items():
        a, b = getattr(recorded, name), getattr(again, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        worst = float(((a - b).abs().double() / bound.double().clamp_min(1e-30)).max())
        assert worst < 1e-5, f"{name}: |recorded - again| reaches {worst:.2e} of the Cauchy-Schwarz bound"


def test_greedy_equals_literal_greedy(tiny_models, records, family):
    ctx, prods, batch, moe, x, z = setup(family, tiny_models, records)
    spec = prods.spec
    r, size = 4, 8 // ctx.groups
    kept_fast, details = search(prods, batch, 8, r, ctx.groups, max_sets=0)
    assert details["mode"] == "greedy"
    kept = list(range(8))
    while len(kept) > r:
        counts = [sum(1 for e in kept if e // size == g) for g in range(ctx.groups)]
        options = [e for e in kept if counts[e // size] > r // ctx.groups]
        # intermediate sets may be unbalanced across routing groups, so no physical model exists: mask instead
        kept.remove(min(options, key=lambda e: (masked_loss(moe, spec, x, z, batch, [k for k in kept if k != e]), e)))
    assert kept_fast == kept


def test_enu_method_and_too_few_experts_for_top_k(tiny_models, records):
    """Through the registry; and with fewer kept experts than top-k (MoP's m=1) the empty slots weigh 0."""
    ctx, prods, batch, moe, x, z = setup("mixtral", tiny_models, records)
    kept, choice = choose(get_method("enu"), ctx, 6)
    assert len(kept) == 6 and choice.details["sets_scored"] == math.comb(8, 6) and len(choice.scores) == 8
    one = torch.zeros(8, dtype=torch.bool)
    one[3] = True
    assert set_loss(prods, batch, one) == pytest.approx(masked_loss(moe, prods.spec, x, z, batch, [3]), rel=1e-6)


def test_short_candidate_lists_stay_exact(tiny_models, records, family):
    """Gram over only each token's top-k candidates (forced here; DeepSeek-V3 caps 256 at 64): routes that leave
    the list rebuild it or are scored from re-run experts, and losses, trials and greedy equal the full Gram's."""
    from mop_ray.methods.greedy import trial_losses

    ctx, full, batch, moe, x, z = setup(family, tiny_models, records)
    ctx.params["enu_candidates"] = ctx.top_k
    short, _, _ = layer_products(ctx, min_kept=2)
    assert short.n_candidates == ctx.top_k < full.n_candidates == 8
    keep = torch.ones(8, dtype=torch.bool)
    keep[[0, 5]] = False  # an intermediate set, unbalanced across routing groups
    options = [e for e in range(8) if keep[e]]
    reference = []
    for e in options:
        trial = keep.clone()
        trial[e] = False
        reference.append(set_loss(full, batch, trial))
    for prods in (short, full):  # the fast path (next-best expert moves up) and full re-routing of every pair
        # (rel 1e-5: float32 softmax over the kept rows, recomputed vs rescaled by 1/(1 − p_e), for qwen2_moe)
        assert trial_losses(prods, batch, keep, options).tolist() == pytest.approx(reference, rel=1e-5)
        assert trial_losses(prods, batch, keep, options, fast=False).tolist() == pytest.approx(reference, rel=1e-6)
    assert short.refreshed > 0  # some routes did leave the short lists
    kept_short, det = search(short, batch, 8, 4, ctx.groups, max_sets=0)
    assert kept_short == search(full, batch, 8, 4, ctx.groups, max_sets=0)[0] and det["candidates"] == ctx.top_k
    # a route through each token's lowest-ranked experts is outside any list drawn from all 8: scored directly
    tok = torch.arange(full.n_tokens)
    idx = full.choice.topk(ctx.top_k, dim=-1, largest=False).indices
    w = torch.rand(idx.shape, generator=torch.Generator().manual_seed(0))
    before = short.direct
    got = short.pair_errors(tok, idx, w, torch.ones(8, dtype=torch.bool))
    assert short.direct - before == full.n_tokens
    assert got.tolist() == pytest.approx(full.pair_errors(tok, idx, w, keep).tolist(), rel=1e-6, abs=1e-9)


def test_half_precision_outputs_give_the_same_products(tiny_models, records, monkeypatch):
    """The CUDA layout (bf16 expert outputs, y as two bf16 parts, rows padded to 16, one fp32-accumulated Gram)
    against the float32 layout, on the same bf16 layer: the expert outputs are the same bf16 values, so the
    products agree to the y split's ~2^-16 and float32 accumulation."""
    from mop_ray.methods import products
    from mop_ray.methods.products import ExpertRunner, expert_products

    ctx, _, batch, moe, x, z = setup("deepseek_v3", tiny_models, records)
    moe = moe.to(torch.bfloat16)
    family = Checkpoint(tiny_models["deepseek_v3"]).family
    spec = family.router_spec(Checkpoint(tiny_models["deepseek_v3"]).config)
    logits = torch.nn.functional.linear(x, moe.gate.weight.float())
    plain = expert_products(moe, family, spec, x, z, logits, min_kept=2)
    assert plain.runner.store == torch.float32
    init = ExpertRunner.__init__

    def half_store(self, *a, **k):
        init(self, *a, **k)
        self.store = torch.bfloat16

    monkeypatch.setattr(products.ExpertRunner, "__init__", half_store)
    half = expert_products(moe, family, spec, x, z, logits, min_kept=2, max_candidates=4)
    assert half.runner.store == torch.bfloat16 and half.n_candidates == 4 < plain.n_candidates
    for name in ("yy", "yf", "ff"):
        a, b = getattr(half, name), getattr(plain, name)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), name
    rows = torch.arange(half.n_tokens)[:, None, None]
    sub = plain.gram[rows, half.cand[:, :, None], half.cand[:, None, :]]  # the full Gram at the short lists
    assert torch.allclose(half.gram.double(), sub.double(), rtol=1e-4, atol=1e-4 * float(sub.abs().max()))
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 6]] = False
    assert set_loss(half, batch, keep) == pytest.approx(set_loss(plain, batch, keep), rel=1e-3)


class _Experts(torch.nn.Module):
    def __init__(self, n, hidden, inter, gen):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(n, 2 * inter, hidden, generator=gen) * hidden ** -0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(n, hidden, inter, generator=gen) * inter ** -0.5)
        self.act_fn = torch.nn.SiLU()


class _Gate(torch.nn.Module):
    def __init__(self, n, hidden, gen):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, hidden, generator=gen) * hidden ** -0.5)
        self.e_score_correction_bias = torch.randn(n, generator=gen) * 0.05


class _NoShared:
    def shared_output(self, moe, x):
        return None


def test_group_left_with_one_expert_keeps_switch_flags_exact():
    """DeepSeek-V3 routing over 8 groups where one group is down to a single kept expert (its top-2 has a
    missing second): the fast trials still equal full rescoring for every expert, expert 0 included."""
    from mop_ray.arch import RouterSpec, route
    from mop_ray.methods.greedy import trial_losses
    from mop_ray.methods.products import expert_products

    gen = torch.Generator().manual_seed(0)
    n, hidden = 32, 16
    moe = torch.nn.Module()
    moe.experts, moe.gate = _Experts(n, hidden, 8, gen), _Gate(n, hidden, gen)
    spec = RouterSpec(top_k=4, scoring="sigmoid", norm_topk_prob=True, n_group=8, topk_group=4,
                      group_score="top2_sum", routed_scaling_factor=2.5, has_correction_bias=True)
    x = torch.randn(2048, hidden, generator=gen)
    logits = x @ moe.gate.weight.T
    z = torch.randn(2048, hidden, generator=gen)
    prods = expert_products(moe, _NoShared(), spec, x, z, logits, min_kept=8)
    batch = torch.arange(2048) * 4 // 2048
    keep = torch.ones(n, dtype=torch.bool)
    keep[[29, 30, 31, 5, 6]] = False  # group 7 keeps only expert 28; group 1 keeps 4 and 7
    options = [e for e in range(n) if keep[e]]
    reference = []
    for e in options:
        trial = keep.clone()
        trial[e] = False
        reference.append(set_loss(prods, batch, trial))
    assert trial_losses(prods, batch, keep, options).tolist() == pytest.approx(reference, rel=1e-9)
    idx, _ = route(spec, logits, moe.gate.e_score_correction_bias, keep=keep)
    assert bool((idx == 0).any())  # expert 0 is routed to, so its flags matter


@pytest.mark.parametrize("router", ["v3", "v2_groups", "qwen3", "qwen2"])
def test_trial_table_rescoring_only_watched_tokens_equals_full_rescoring(router):
    """Greedy's table keeps every token's trial rows and rescores only the tokens that watched the removed
    expert: at every step down to two experts per group its losses equal a full reference rescoring (every
    affected pair routed again with ``route``), for sigmoid/group, softmax/group, and softmax with and without
    top-k renormalisation; where renormalisation holds, most rows are left alone."""
    from mop_ray.arch import RouterSpec
    from mop_ray.methods.greedy import TrialTable, trial_losses
    from mop_ray.methods.products import expert_products

    specs = {
        "v3": RouterSpec(top_k=4, scoring="sigmoid", norm_topk_prob=True, n_group=8, topk_group=4,
                         group_score="top2_sum", routed_scaling_factor=2.5, has_correction_bias=True),
        "v2_groups": RouterSpec(top_k=4, scoring="softmax", norm_topk_prob=False, n_group=4, topk_group=2,
                                group_score="max"),
        "qwen3": RouterSpec(top_k=4, scoring="softmax", norm_topk_prob=True),
        "qwen2": RouterSpec(top_k=4, scoring="softmax", norm_topk_prob=False),
    }
    spec = specs[router]
    gen = torch.Generator().manual_seed(1)
    n, hidden, n_tokens = 32, 16, 1024
    moe = torch.nn.Module()
    moe.experts, moe.gate = _Experts(n, hidden, 8, gen), _Gate(n, hidden, gen)
    x = torch.randn(n_tokens, hidden, generator=gen)
    logits = x @ moe.gate.weight.T
    z = torch.randn(n_tokens, hidden, generator=gen)
    prods = expert_products(moe, _NoShared(), spec, x, z, logits, min_kept=8)
    batch = torch.arange(n_tokens) * 4 // n_tokens
    groups = spec.n_group
    size = n // groups
    keep = torch.ones(n, dtype=torch.bool)
    table = TrialTable(prods, batch, keep)
    steps = 0
    while True:
        counts = [int(keep[g * size:(g + 1) * size].sum()) for g in range(groups)]
        options = [e for e in range(n) if keep[e] and counts[e // size] > 2]
        if not options:
            break
        got = table.losses(torch.tensor(options))
        reference = trial_losses(prods, batch, keep, options, fast=False)
        assert got.tolist() == pytest.approx(reference.tolist(), rel=1e-6), f"step {steps}"
        drop = options[int(reference.argmin())]
        keep[drop] = False
        table.remove(drop)
        steps += 1
    assert steps == n - 2 * groups
    if router in ("qwen2", "v2_groups"):  # weights renormalise over the kept softmax rows: every token changes
        assert table.rescored == steps * n_tokens
    else:
        assert table.rescored < steps * n_tokens * 0.7


def _gpu_case(seed: int):
    """Products of 64 experts in DeepSeek-V3-style group routing over 3,000 tokens on the GPU -> (prods, batch, keep)."""
    from mop_ray.arch import RouterSpec
    from mop_ray.methods.products import expert_products

    spec = RouterSpec(top_k=4, scoring="sigmoid", norm_topk_prob=True, n_group=8, topk_group=4,
                      group_score="top2_sum", routed_scaling_factor=2.5, has_correction_bias=True)
    gen = torch.Generator().manual_seed(seed)
    n, hidden, n_tokens = 64, 16, 3000
    moe = torch.nn.Module()
    moe.experts, moe.gate = _Experts(n, hidden, 8, gen), _Gate(n, hidden, gen)
    x = torch.randn(n_tokens, hidden, generator=gen)
    logits, z = x @ moe.gate.weight.T, torch.randn(n_tokens, hidden, generator=gen)
    moe = moe.cuda()
    moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.cuda()
    prods = expert_products(moe, _NoShared(), spec, x.cuda(), z.cuda(), logits.cuda(), min_kept=16, max_candidates=16)
    batch = (torch.arange(n_tokens) * 4 // n_tokens).cuda()
    return prods, batch, torch.ones(n, dtype=torch.bool, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_trial_table_cuda_graphs_equal_eager_rows():
    """On a GPU the table rescores through captured CUDA graphs (padded token counts): the same rows as eager."""
    from mop_ray.methods.greedy import TrialTable

    prods, batch, keep = _gpu_case(2)
    graphed, eager = TrialTable(prods, batch, keep), TrialTable(prods, batch, keep)
    eager.graphs = None
    assert graphed.graphs is not None
    for e in (3, 17, 40, 41, 9, 60, 33):
        graphed.remove(e)
        eager.remove(e)
        assert torch.equal(graphed.watch, eager.watch)
        scale = float(eager.err.abs().max())  # delta is a difference of errors: compare on their scale
        assert float((graphed.delta - eager.delta).abs().max()) <= 1e-12 * scale
        assert float((graphed.err - eager.err).abs().max()) <= 1e-12 * scale
    assert len(graphed.graphs.graphs) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_trial_table_captures_in_a_thread_while_another_computes_and_copies():
    """A stage selects a layer (capturing greedy's graphs on its worker's stream) while its observe thread runs
    matmuls, allocates and copies to pinned memory: both finish, and the graphed rows equal eager rows."""
    import threading

    from mop_ray.methods.greedy import TrialTable

    prods, batch, keep = _gpu_case(3)
    eager = TrialTable(prods, batch, keep)
    eager.graphs = None
    removed = (3, 17, 40, 41, 9, 60, 33)
    for e in removed:
        eager.remove(e)
    stop, errors, out = threading.Event(), [], {}

    def observe_like():  # the observe thread's kinds of work on the default stream
        try:
            a = torch.randn(2048, 2048, device="cuda")
            while not stop.is_set():
                b = (a @ a).relu_()
                host = torch.empty(b.shape, pin_memory=True).copy_(b, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                done.synchronize()
                out["sum"] = float(host[0, 0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def select_like():
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                table = TrialTable(prods, batch, keep)
                for e in removed:
                    table.remove(e)
                torch.cuda.current_stream().synchronize()
            out["table"] = table
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    busy = threading.Thread(target=observe_like)
    busy.start()
    sel = threading.Thread(target=select_like)
    sel.start()
    sel.join(120)
    stop.set()
    busy.join(120)
    assert not errors, errors
    table = out["table"]
    assert table.graphs is not None and len(table.graphs.graphs) >= 1
    assert torch.equal(table.watch, eager.watch)
    scale = float(eager.err.abs().max())
    assert float((table.delta - eager.delta).abs().max()) <= 1e-12 * scale
    assert "sum" in out


def test_trial_table_falls_back_to_eager_steps_when_graph_capture_fails(tiny_models, records):
    """A torch or driver that refuses the step's CUDA-graph capture costs a warning, not the selection: the step
    is scored eagerly, with the same rows."""
    from mop_ray.methods.greedy import TrialTable

    ctx, prods, batch, moe, x, z = setup("deepseek_v3", tiny_models, records)
    keep = torch.ones(8, dtype=torch.bool)
    table, eager = TrialTable(prods, batch, keep), TrialTable(prods, batch, keep)

    def refuse(tok):
        raise RuntimeError("operation not permitted when stream is capturing")

    table.graphs = refuse
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        table.remove(3)
    eager.remove(3)
    assert table.graphs is None
    assert torch.equal(table.watch, eager.watch) and torch.allclose(table.delta, eager.delta)


@pytest.mark.parametrize("method", ["enu", "mop"])
def test_a_sample_without_products_selects_what_the_recorded_products_select(tiny_models, records, family, method,
                                                                            tmp_path, monkeypatch):
    """A layer of more experts than ``RECORD_UP_TO`` (DeepSeek-V3's 256) records its rows' outputs z instead of
    their products, and selection runs every expert on the sample: the same choice as from the products."""
    from conftest import record_layers
    from mop_ray.methods import products

    ckpt = Checkpoint(tiny_models[family])
    layer = ckpt.moe_layers[-1]
    groups = (ckpt.family.group_constraints(ckpt.config) or (1,))[0]
    with_products = records(family)
    with monkeypatch.context() as m:
        m.setattr(products, "RECORD_UP_TO", 0)  # these 8 experts recorded as if they were more than the limit
        without = record_layers(tiny_models[family], tmp_path / "plain")
    sample = LayerRecords(without, layer).sample
    assert sample.has_outputs and not sample.has_products and len(sample) == 256
    answers = []
    for run_dir in (with_products, without):
        ctx = LayerContext(layer, ckpt.num_experts, ckpt.top_k, groups, seed=0, model_dir=str(ckpt.path),
                           records=LayerRecords(run_dir, layer))
        answers.append(choose(get_method(method), ctx, 4))
    (kept_a, a), (kept_b, b) = answers
    assert kept_a == kept_b
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-9)

"""MoP, GVP, TB-Coverage and C-Prune: hand-computed cases, then every family through the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.methods import LayerContext, choose, get_method
from mop_ray.methods.cprune import coef, votes
from mop_ray.methods.mosaic import activation_variability, kmeans, spearman_ward, split_general
from mop_ray.methods.tb_coverage import coverage
from mop_ray.observe.records import LayerRecords


def s_var_direct(p: np.ndarray) -> np.ndarray:
    """MoP Eq. 2 literally, for p [N, n]."""
    n_tokens = p.shape[0]
    pn = p / p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pn > 0, pn * np.log2(pn * n_tokens), 0.0)
    return terms.sum(0)


def test_activation_variability_known_distributions():
    n = 64
    uniform = np.full((n, 1), 0.3)
    onehot = np.zeros((n, 1))
    onehot[5] = 0.9
    for p, expect in ((uniform, 0.0), (onehot, math.log2(n))):
        got = activation_variability(p.sum(0), np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0).sum(0), n)
        assert got[0] == pytest.approx(expect, abs=1e-12)
    p = np.random.default_rng(0).dirichlet(np.ones(8), size=200)  # [200, 8] softmax-like rows
    streamed = activation_variability(p.sum(0), (p * np.log2(p)).sum(0), 200)
    np.testing.assert_allclose(streamed, s_var_direct(p), rtol=1e-10)


def test_spearman_ward_groups_by_profile_shape_not_scale():
    perf = np.array([
        [1.0, 2.0, 3.0, 4.0],      # good at domain 0 ...
        [10.0, 20.0, 30.0, 40.0],  # same ranking, 10x the error: same cluster (Spearman, not Euclidean)
        [4.0, 3.0, 2.0, 1.0],      # opposite profile
        [40.0, 30.0, 20.0, 10.0],
        [2.0, 1.0, 4.0, 3.0],
    ])
    labels = spearman_ward(perf, 3)
    assert labels[0] == labels[1] and labels[2] == labels[3] and len(set(labels)) == 3
    assert labels[4] not in (labels[0], labels[2])
    np.testing.assert_array_equal(spearman_ward(perf, 3), labels)  # deterministic


def test_spearman_ward_gives_exactly_k_clusters_under_ties():
    perf = np.tile([1.0, 2.0, 3.0], (6, 1))  # six identical profiles: every merge height is 0
    for k in (1, 2, 3, 5, 6):
        assert len(set(spearman_ward(perf, k))) == k
    assert spearman_ward(np.ones((4, 3)), 2).tolist().count(0) >= 1  # constant rows do not crash


def test_kmeans_finds_separated_blobs_reproducibly():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + torch.randn(50, 2, generator=gen) for c in centers])
    labels = kmeans(x, 3, seed=1)
    for b in range(3):
        assert len(set(labels[b * 50:(b + 1) * 50].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    assert torch.equal(labels, kmeans(x, 3, seed=1))


def test_kmeans_seeding_picks_what_a_multinomial_per_centre_picks():
    """The device-side seeding (every centre from pre-drawn exponentials, all inits at once) chooses the centres
    k-means++ with torch.multinomial on the host per centre chooses, so K-Means labels for a seed are unchanged."""
    from mop_ray.methods.mosaic import _seed_centers, seeding_draws

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 8, generator=gen) + torch.randn(5, 8, generator=gen).repeat(80, 1) * 4
    x2 = x.pow(2).sum(-1)
    for seed, k in ((0, 2), (1, 5), (7, 9)):
        ref, g = [], torch.Generator().manual_seed(seed)
        for _ in range(3):  # the reference: one init after another, a host multinomial per centre
            c = [x[torch.randint(400, (1,), generator=g).item()]]
            d2 = (x2 - 2 * x @ c[0] + c[0].pow(2).sum()).clamp_min(0)
            for _ in range(1, k):
                c.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g).item()])
                d2 = torch.minimum(d2, (x2 - 2 * x @ c[-1] + c[-1].pow(2).sum()).clamp_min(0))
            ref.append(torch.stack(c))
        got = _seed_centers(x, x2, *seeding_draws(400, k, seed))  # [3, k, H]
        assert torch.equal(got, torch.stack(ref)), (seed, k)


def test_split_general_defaults_and_groups():
    assert split_general(6, None, 1) == 3 and split_general(4, None, 1) == 2 and split_general(5, 1, 1) == 1
    assert split_general(4, None, 2) == 2 and split_general(8, 3, 2) == 4


def test_coverage_round_robin_then_pooled_fill():
    u = np.array([
        [9.0, 8.0, 0.0, 0.0, 1.0, 0.0],  # source A loves experts 0, 1
        [0.0, 0.0, 9.0, 8.0, 1.0, 0.0],  # source B loves experts 2, 3
    ])
    protected, kept = coverage(u, budget=4, lam=0.5)
    assert protected == [0, 2] and len(kept) == 4
    assert kept == [0, 1, 2, 3]  # pooled fill: 1 and 3 (8/18 each) beat 4 (1/18)
    protected, kept = coverage(u, budget=3, lam=1.0)
    assert protected == [0, 2, 1] and kept == [0, 1, 2]
    assert coverage(u, budget=2, lam=0.0)[1] == [0, 2]


def test_cprune_coef_and_votes():
    assert coef(6, 12) == pytest.approx(0.6 * (1 - 1 / 2) + 0.5)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 4, 8))  # three distinct behaviours
    outputs = np.concatenate([base + rng.normal(scale=1e-3, size=base.shape) for _ in range(3)])  # [9, 4, 8]
    outputs[8] += 5.0  # one outlier in the third family
    v, dist = votes(outputs, n_clusters=4, prune_rate=0.5, batch=2)
    assert v.shape == (9,) and dist.shape == (9,)
    assert v[8] == 2  # alone in its cluster (s < 3): always voted for


FAMILY_METHODS = ["mop", "gvp", "tb-coverage", "cprune", "frequency", "reap", "ean"]


@pytest.mark.parametrize("method", FAMILY_METHODS)
def test_methods_on_every_family_return_valid_sets(tiny_models, records, family, method):
    ckpt = Checkpoint(tiny_models[family])
    groups = (ckpt.family.group_constraints(ckpt.config) or (1,))[0]
    for layer in ckpt.moe_layers:
        ctx = LayerContext(layer, 8, 2, groups, seed=0, model_dir=str(ckpt.path),
                           records=LayerRecords(records(family), layer), params={"cprune_batch": 4})
        kept, choice = choose(get_method(method), ctx, 4)
        assert kept == sorted(set(kept)) and len(kept) == 4
        if groups == 2:
            assert sum(1 for e in kept if e < 4) == 2
        if method in ("mop", "gvp"):
            assert set(choice.details["general"]) <= set(kept) and choice.details["m"] == 2
            assert len(choice.details["s_var"]) == 8
        if method == "mop":
            assert len(choice.details["specialists"]) == 2 and sum(choice.details["domain_sizes"]) == 256
        again, _ = choose(get_method(method), ctx, 4)
        assert again == kept  # deterministic for a seed


def test_prune_mop_end_to_end_loads_in_transformers(tiny_models, family, tmp_path, ray_local):
    import json

    from transformers import AutoModelForCausalLM

    from mop_ray.cli import main

    out = tmp_path / "mop"
    assert main(["prune", "--model", str(tiny_models[family]), "--out", str(out), "--method", "mop", "--keep", "4",
                 "--tokens", "256", "--seq-len", "32", "--micro-batch", "2"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 11]])
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["method"] == "mop"
    for layer, det in pruning["details"].items():
        assert set(det["general"]) | set(det["specialists"]) == set(pruning["keep_map"][layer])


@pytest.mark.parametrize("fam, method, dtype", [("deepseek_v3", "mop", None), ("mixtral", "enu", None),
                                               ("qwen2_moe", "cprune", None), ("olmoe", "gvp", "bfloat16")])
def test_selection_in_the_stages_equals_selection_in_tasks(tiny_models, tmp_path, ray_local, fam, method, dtype):
    """A method that recomputes experts selects inside the stage actors, with the layers they hold (two stages
    here; record-only methods select there too: ``test_records_match_the_unsplit_model``); redoing only the select
    phase from the same records, in one task per layer that loads its layer from disk (in the stages' --dtype),
    gives the same kept experts and scores."""
    import json

    from actors.coordinator import run

    from conftest import small_job

    run_dir = tmp_path / "run"
    job = small_job(tiny_models[fam], tmp_path / "a", method=method, stages=2, run_dir=str(run_dir), dtype=dtype)
    staged = run(job, log=lambda *_: None)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    first = manifest["phases"].pop("select")
    assert first["in"] == "stages"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))  # the select phase is redone, nothing else
    lines = []
    tasks = run(small_job(tiny_models[fam], tmp_path / "b", method=method, stages=2, run_dir=str(run_dir), resume=True,
                          dtype=dtype), log=lines.append)
    again = json.loads((run_dir / "manifest.json").read_text())["phases"]["select"]
    assert again["in"] == "tasks" and any("observe: all layers recorded" in line for line in lines)
    assert tasks["keep_map"] == staged["keep_map"]
    for layer, scores in first["scores"].items():
        np.testing.assert_allclose(again["scores"][layer], scores, rtol=1e-6, atol=1e-9)


def test_selection_lets_go_of_the_layers_records(tiny_models, records, monkeypatch):
    """A stage selects its layers in turn with the coordinator's contexts still alive: each layer's sample must be
    freed when its selection returns, or the stage's memory grows by a sample per layer (seen on an H200:
    11.4 GB after 8 Mixtral-shaped layers)."""
    import gc
    import weakref

    import actors.tasks as tasks
    from mop_ray.prune import layer_context

    made = []

    class Tracked(LayerRecords):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(tasks, "LayerRecords", Tracked)
    ckpt = Checkpoint(tiny_models["mixtral"])
    ctx = layer_context(ckpt, ckpt.moe_layers[0], 0)
    layer, kept, _, _ = tasks.select_layer(str(records("mixtral")), ctx, "mop", 4)
    gc.collect()
    assert len(kept) == 4 and len(made) == 1 and made[0]() is None
    assert ctx.records is None and ctx.block is None

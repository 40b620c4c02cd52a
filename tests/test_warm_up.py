"""A stage's warm-up: a stand-in of its first MoE layer runs one micro-batch beside the load (actors/warm_up.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.warm_up import TMP_PREFIX, standin_experts, warm_up
from mop_ray.arch.layer import rotary_embedding
from mop_ray.arch.routing import RouterSpec, route
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.observe.records import STAT_FIELDS, read_sample, read_stats


@pytest.mark.parametrize("spec,n,expected", [
    (RouterSpec(top_k=2), 8, 2),  # Mixtral-8x7B
    (RouterSpec(top_k=8), 128, 8),  # Qwen3-235B
    (RouterSpec(top_k=6, n_group=8, topk_group=3, group_score="max"), 160, 16),  # DeepSeek-V2
    (RouterSpec(top_k=8, n_group=8, topk_group=4, group_score="top2_sum"), 256, 16),  # DeepSeek-V3
    (RouterSpec(top_k=8, n_group=8, topk_group=4, group_score="top2_sum"), 16, 16),  # DeepSeek-V3 pruned to 16
])
def test_the_standin_has_the_fewest_experts_its_routing_allows(spec, n, expected):
    got = standin_experts(spec, n)
    assert got == expected
    logits = torch.randn(64, got)  # [T, E]: every token routes to top_k distinct experts among them
    idx, _ = route(spec, logits)
    assert idx.shape == (64, spec.top_k) and all(len(set(row)) == idx.shape[1] for row in idx.tolist())


def _leftovers() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(TMP_PREFIX + "*"))


def test_a_warm_up_runs_a_standin_of_every_family_and_leaves_nothing(tiny_models, family):
    ckpt = Checkpoint(tiny_models[family])
    layer = ckpt.moe_layers[0]
    before = _leftovers()
    done = warm_up(ckpt, layer, rotary_embedding(ckpt), torch.device("cpu"), torch.float32, (2, 16))
    spec = ckpt.family.router_spec(ckpt.config)
    assert done["experts"] == standin_experts(spec, ckpt.experts_in(layer)) < ckpt.experts_in(layer)
    assert done["rows"] == 2 * 16 // 4 and done["s"] > 0  # every 4th token sampled, then thrown away
    assert _leftovers() == before
    dense = [i for i in range(ckpt.num_layers) if i not in ckpt.moe_layers]
    if dense:  # a dense layer warms up unobserved
        dense_done = warm_up(ckpt, dense[0], rotary_embedding(ckpt), torch.device("cpu"), torch.float32, (1, 8))
        assert dense_done["rows"] is None and dense_done["experts"] is None


@pytest.mark.parametrize("fail", [False, True])
def test_a_warmed_up_stage_records_what_a_cold_one_records(tiny_models, tmp_path, monkeypatch, capfd, fail):
    """The warm-up (forced on the CPU here; it runs on GPUs only) leaves the stage's records as they were, and a
    warm-up that fails is logged and skipped."""
    import actors.layer_shard as shard

    model = tiny_models["deepseek_v3"]
    ckpt = Checkpoint(model)
    monkeypatch.setattr(shard, "WARM_UP_DEVICES", ("cuda", "cpu"))
    if fail:
        def broken(*args):
            raise RuntimeError("no room")
        monkeypatch.setattr(shard, "warm_up_layer", broken)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    meta = {"source": np.array([0, 1]), "block": np.array([0, 1]), "sample": np.ones((2, 16), bool)}
    outs = {}
    for name, shape in (("cold", None), ("warm", (2, 16))):
        worker = shard.LayerShardWorker(str(model), list(range(ckpt.num_layers)), str(tmp_path / name),
                                        ["code", "math"], first_stage=True, warm_up=shape)
        h = worker.forward(0, ids, meta)
        worker.finish()
        outs[name] = h, {i: (read_sample(tmp_path / name, i), read_stats(tmp_path / name, i)) for i in ckpt.moe_layers}
        if shape is not None:
            assert worker._warmed.done()
            assert ("warm_up_s" in worker.load_times) is not fail
    err = capfd.readouterr().err
    assert ("stage warm-up on layer 1 failed, going on without it: RuntimeError: no room" in err) is fail
    assert torch.equal(outs["cold"][0], outs["warm"][0])
    for i in ckpt.moe_layers:
        (sa, ta), (sb, tb) = outs["cold"][1][i], outs["warm"][1][i]
        assert np.array_equal(sa.x, sb.x) and sa.table.num_rows == sb.table.num_rows == 32
        for f in STAT_FIELDS:  # float64 sums: CUDA's index_add_ adds in any order (on the CPU: equal)
            np.testing.assert_allclose(ta.by_source[f], tb.by_source[f], rtol=1e-12, atol=0)
    names = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("cold", "warm")}
    assert names["warm"] == names["cold"]

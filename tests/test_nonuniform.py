"""Non-uniform checkpoints (different expert counts per layer): written marked, refused by stock loaders,
loaded by ``mop_ray.load_pruned`` equal to the source pruned in memory, for every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mop_ray
from mop_ray.checkpoint.nonuniform import MARKER
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.verify import verify
from mop_ray.checkpoint.writer import write_pruned
from mop_ray.cli import main
from mop_ray.errors import MopError

from conftest import fake_gpus
from tests.test_prune_checkpoint import load, prune_in_memory


def nonuniform_keep_map(ckpt: Checkpoint, seed: int = 0) -> dict[str, list[int]]:
    """Different counts per MoE layer, balanced across routing groups where routing is group-limited."""
    rng = np.random.default_rng(seed)
    n, groups = ckpt.num_experts, (ckpt.family.group_constraints(ckpt.config) or (1, 1))[0]
    counts = [6, 4, 5] if groups == 1 else [6, 4, 8]
    size = n // groups
    keep = {}
    for j, layer in enumerate(ckpt.moe_layers):
        per = counts[j % len(counts)] // groups
        keep[str(layer)] = sorted(int(g * size + e) for g in range(groups) for e in rng.choice(size, per, replace=False))
    return keep


def test_nonuniform_checkpoint_loads_with_load_pruned_and_equals_in_memory_pruning(tiny_models, family, tmp_path):
    src = tiny_models[family]
    ckpt = Checkpoint(src)
    keep = nonuniform_keep_map(ckpt)
    res = write_pruned(ckpt, tmp_path / "nu", keep, max_shard_size="100KB", allow_nonuniform=True)

    config = json.loads((res.out / "config.json").read_text())
    assert config[MARKER]["experts_per_layer"] == {k: len(v) for k, v in keep.items()}
    assert config[MARKER]["model_type"] == ckpt.config["model_type"]
    out = Checkpoint(res.out)  # the reader understands the marker and checks every layer's own count
    assert out.experts_per_layer == {int(k): len(v) for k, v in keep.items()}
    assert verify(res.out)["checksums"] == res.shards

    model = mop_ray.load_pruned(res.out, dtype=torch.float32)
    for layer, ids in keep.items():
        assert model.model.layers[int(layer)].mlp.experts.gate_up_proj.shape[0] == len(ids)
    reference = prune_in_memory(load(src), keep)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_stock_from_pretrained_refuses_a_nonuniform_checkpoint_loudly(tiny_models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Checkpoint(tiny_models["mixtral"])
    out = write_pruned(ckpt, tmp_path / "nu", nonuniform_keep_map(ckpt), allow_nonuniform=True).out
    for load_fn in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="mop_ray.load_pruned"):
            load_fn(out)
    with pytest.raises(ValueError, match="mop_ray.load_pruned"):  # not even when told to ignore size mismatches
        AutoModelForCausalLM.from_pretrained(out, ignore_mismatched_sizes=True)


def test_uniform_checkpoints_go_through_from_pretrained(tiny_models, tmp_path):
    ckpt = Checkpoint(tiny_models["qwen3_moe"])
    keep = {str(i): [0, 2, 5, 7] for i in ckpt.moe_layers}
    out = write_pruned(ckpt, tmp_path / "u", keep, allow_nonuniform=True).out  # equal counts: a stock checkpoint
    assert MARKER not in json.loads((out / "config.json").read_text())
    model = mop_ray.load_pruned(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        ids = torch.arange(12)[None]
        assert (model(ids).logits - load(out)(ids).logits).abs().max().item() == 0


def test_nonuniform_keep_maps_need_the_flag_and_obey_per_layer_rules(tiny_models, tmp_path):
    ckpt = Checkpoint(tiny_models["deepseek_v3"])
    keep = nonuniform_keep_map(ckpt)
    path = tmp_path / "k.json"
    path.write_text(json.dumps(keep))
    with pytest.raises(MopError, match="--allow-nonuniform"):
        write_pruned(ckpt, tmp_path / "a", keep)
    assert not (tmp_path / "a").exists()
    bad = dict(keep, **{str(ckpt.moe_layers[0]): [0, 1, 2, 4, 5, 6]})  # 3 + 3 per group is fine ...
    write_pruned(ckpt, tmp_path / "b", bad, allow_nonuniform=True)
    bad[str(ckpt.moe_layers[0])] = [0, 1, 2, 4]  # ... 3 + 1 is not
    with pytest.raises(MopError, match="routing groups"):
        write_pruned(ckpt, tmp_path / "c", bad, allow_nonuniform=True)
    bad[str(ckpt.moe_layers[0])] = [0, 4]  # 1 per group: V3 scores groups by their top-2 sum
    with pytest.raises(MopError, match="experts per group"):
        write_pruned(ckpt, tmp_path / "c", bad, allow_nonuniform=True)
    assert main(["prune", "--model", str(ckpt.path), "--out", str(tmp_path / "cli"), "--keep-map", str(path),
                 "--allow-nonuniform"]) == 0
    assert Checkpoint(tmp_path / "cli").experts_per_layer == {int(k): len(v) for k, v in keep.items()}
    assert main(["prune", "--model", str(tmp_path / "cli"), "--out", str(tmp_path / "again"), "--keep", "4"]) == 2
    assert not (tmp_path / "again").exists()


# --- C-Prune's global stage ------------------------------------------------------------------------------

def test_allocate_spends_the_budget_on_the_best_scored_layers_within_bounds():
    from mop_ray.methods.cprune import allocate

    scores = {0: np.array([9.0, 8, 7, 1, 1, 1]), 1: np.array([6.0, 5, 4, 3, 2, 2])}
    valid = {0: [2, 3, 4, 5, 6], 1: [2, 3, 4, 5, 6]}
    assert allocate(scores, valid, 1, 8) == {0: 3, 1: 5}  # the global top 8 of the 12 survivors, at least 2 each
    assert allocate(scores, valid, 1, 4) == {0: 2, 1: 2}
    steps = {0: [2, 4, 6], 1: [2, 4, 6]}  # routing groups: counts move one expert per group at a time
    assert allocate(scores, steps, 2, 8) == {0: 4, 1: 4}  # pairs by mean: (7, 1) = 4 first, then (4, 3) = 3.5
    assert allocate(scores, steps, 2, 10) == {0: 4, 1: 6}  # then (2, 2) = 2 beats (1, 1) = 1
    with pytest.raises(MopError, match="between 4 and 12"):
        allocate(scores, valid, 1, 13)


def test_global_stage_takes_experts_from_the_layer_whose_experts_are_redundant(tiny_models, tmp_path):
    from mop_ray.methods import Choice
    from mop_ray.methods.cprune import global_stage

    ckpt = Checkpoint(tiny_models["mixtral"])  # 8 experts, top-2
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    redundant = np.stack([base + rng.normal(scale=1e-3, size=base.shape) for _ in range(6)]
                         + [rng.normal(scale=3.0, size=base.shape) for _ in range(2)])  # [8, B=4, H=16]
    distinct = np.stack([rng.normal(scale=3.0, size=base.shape) for _ in range(8)])
    choices = {}
    for layer, outputs in ((0, redundant), (1, distinct), (2, distinct[::-1] * 0.5)):
        np.save(tmp_path / f"{layer}.npy", outputs.astype(np.float32))
        choices[layer] = Choice(np.zeros(8), list(range(8)), {"votes": [0] * 8, "outputs": str(tmp_path / f"{layer}.npy")})
    kept = global_stage(ckpt, choices, 5, {"cprune_batch": 4, "cprune_global_clusters": 8})
    assert sum(len(v) for v in kept.values()) == 15
    assert len(kept[0]) < min(len(kept[1]), len(kept[2]))  # most of the six near-copies go
    assert sum(1 for e in kept[0] if e < 6) <= 3  # C-Prune keeps the copies nearest their centroid, about half
    assert all(choices[l].details["count"] == len(kept[l]) for l in kept)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # plain and group-limited routing (suite time)
def test_cprune_global_gives_valid_loadable_nonuniform_checkpoints(tiny_models, records, family, tmp_path):
    from mop_ray.methods import LayerContext, choose, get_method
    from mop_ray.observe.records import LayerRecords

    ckpt = Checkpoint(tiny_models[family])
    groups = (ckpt.family.group_constraints(ckpt.config) or (1,))[0]
    method = get_method("cprune-global")
    choices = {}
    for layer in ckpt.moe_layers:
        ctx = LayerContext(layer, 8, 2, groups, model_dir=str(ckpt.path), records=LayerRecords(records(family), layer),
                           params={"cprune_batch": 4, "cprune_rate": 0.25})
        survivors, choices[layer] = choose(method, ctx, 4)
        assert len(survivors) == 6 and choices[layer].details["layer_pruned"] == sorted(set(range(8)) - set(survivors))
    kept = method.combine(ckpt, choices, 4, {"cprune_batch": 4})
    assert sum(len(v) for v in kept.values()) == 4 * len(ckpt.moe_layers)
    for layer, ids in kept.items():
        assert set(ids) <= set(choices[layer].kept) or len(ids) == 6  # layer-pruned experts only return when needed
    out = write_pruned(ckpt, tmp_path / "o", {str(k): v for k, v in kept.items()}, allow_nonuniform=True).out
    model = mop_ray.load_pruned(out, dtype=torch.float32)
    assert torch.isfinite(model(torch.arange(10)[None]).logits).all()


def test_prune_cprune_global_end_to_end(tiny_models, tmp_path, ray_local):
    """On a Ray with one (fake) GPU, which the stage holds: the global stage runs beside it (it asked for a GPU and
    waited forever before)."""
    out = tmp_path / "cg"
    with fake_gpus(ray_local, 1):
        assert main(["prune", "--model", str(tiny_models["deepseek_v3"]), "--out", str(out), "--method",
                     "cprune-global", "--keep", "4", "--tokens", "256", "--seq-len", "32", "--micro-batch", "2"]) == 0
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["method"] == "cprune-global"
    counts = {int(k): len(v) for k, v in pruning["keep_map"].items()}
    assert sum(counts.values()) == 8 and all(c in (4, 6) or c == 2 * 2 for c in counts.values())
    assert all("global_votes" in d for d in pruning["details"].values())
    assert main(["verify", str(out)]) == 0
    model = mop_ray.load_pruned(out, dtype=torch.float32)
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)

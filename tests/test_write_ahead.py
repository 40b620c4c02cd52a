"""Output shards written while the experts are still being chosen (``ShardsAhead``): with r experts kept in every
layer the shards are known before any layer is chosen, each is written once its layers are, and the checkpoint
equals one written after selection; a shard whose layers end up chosen differently, or whose write failed, is
written again."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.writer import ShardsAhead, parse_size, plan_output, write_one_shard, write_pruned


def random_keep(ckpt: Checkpoint, r: int, seed: int) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {i: sorted(int(e) for e in rng.choice(ckpt.num_experts, r, replace=False)) for i in ckpt.moe_layers}


def layout(ckpt: Checkpoint, keep: dict, size: str | int = "100KB") -> list:
    return [[(t.name, t.dtype, tuple(t.shape), t.nbytes) for t in shard]
            for shard in plan_output(ckpt, keep, parse_size(size))]


def output(out) -> tuple[dict, dict]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return index["weight_map"], {s: (out / s).read_bytes() for s in set(index["weight_map"].values())}


@pytest.fixture(scope="module")
def twelve_experts(tmp_path_factory):
    """Mixtral with 12 experts stored one tensor per expert: kept ids 10 and 11 sort before 2 as names."""
    from mop_ray.zoo.tiny import build_tiny

    return build_tiny("mixtral", tmp_path_factory.mktemp("mixtral12") / "m", num_local_experts=12)


def test_the_shard_layout_does_not_depend_on_which_experts_are_kept(tiny_models, family, twelve_experts):
    """... and a shard holds one decoder layer at most (embedding, norm and LM head first): each layer's shards can
    be written as soon as it is chosen, and only the last one's are left for after selection."""
    for path in (tiny_models[family], twelve_experts):
        ckpt = Checkpoint(path)
        first = layout(ckpt, {i: list(range(4)) for i in ckpt.moe_layers})
        assert len(first) > 2
        for seed in range(3):
            assert layout(ckpt, random_keep(ckpt, 4, seed)) == first
        layers = [[ckpt.layer_of(name) for name, *_ in shard] for shard in first]
        assert all(len(set(held)) == 1 for held in layers)
        assert [held[0] for held in layers] == sorted((held[0] for held in layers), key=lambda j: -1 if j is None else j)
        assert layers[-1][0] == ckpt.num_layers - 1 == max(ckpt.moe_layers)


def test_the_last_moe_layers_are_spread_over_shards_of_about_equal_size(tiny_models, family, monkeypatch):
    """Their shards are written when the waves are over: each of the last ``TAIL_LAYERS`` MoE layers in up to
    ``TAIL_SHARDS`` shards, written side by side, cut between tensors; every other layer keeps one shard."""
    from mop_ray.checkpoint import writer

    ckpt = Checkpoint(tiny_models[family])
    keep = {i: list(range(4)) for i in ckpt.moe_layers}
    tail = sorted(ckpt.moe_layers)[-writer.TAIL_LAYERS:]
    per_layer = Counter()
    for t in writer.plan_tensors(ckpt, keep):
        per_layer[ckpt.layer_of(t.name)] += t.nbytes
    size = max(per_layer.values())  # a shard limit every layer fits in, below the whole output

    def plan():
        shards = plan_output(ckpt, keep, size)
        return shards, [{ckpt.layer_of(t.name) for t in shard} for shard in shards]

    monkeypatch.setattr(writer, "TAIL_MIN_BYTES", min(per_layer[i] for i in tail) // 3)  # room for three parts
    shards, held = plan()
    assert all(len(layers) == 1 for layers in held)
    order = sorted(per_layer, key=lambda j: -1 if j is None else j)
    assert [held.count({i}) for i in order] == [3 if i in tail else 1 for i in order]
    for i in tail:
        sizes = [sum(t.nbytes for t in shard) for shard, layers in zip(shards, held) if layers == {i}]
        assert sum(sizes) == per_layer[i] and max(sizes) < per_layer[i] / 2  # no part holds most of the layer
    for seed in range(3):  # still the same whichever experts are kept
        assert layout(ckpt, random_keep(ckpt, 4, seed), size) == layout(ckpt, keep, size)

    monkeypatch.setattr(writer, "TAIL_MIN_BYTES", max(per_layer.values()) + 1)  # layers below one part: one shard
    assert [plan()[1].count({i}) for i in order] == [1] * len(order)


def local_submit(pool: ThreadPoolExecutor, submitted: list, fail: set = frozenset()):
    def submit(directory, index, count, tensors) -> Future:
        submitted.append(index)
        if index in fail:
            f = Future()
            f.set_exception(OSError("writer lost"))
            return f
        return pool.submit(write_one_shard, directory, index, count, tensors)
    return submit


def test_shards_start_once_their_layers_are_chosen_and_equal_a_write_after_selection(tiny_models, tmp_path,
                                                                                     monkeypatch):
    from mop_ray.checkpoint import writer

    monkeypatch.setattr(writer, "TAIL_MIN_BYTES", 1)  # the last layers in TAIL_SHARDS shards each, started together
    ckpt = Checkpoint(tiny_models["deepseek_v3"])  # dense layer 0, MoE layers 1-2, an MTP layer (dropped)
    first, second = ckpt.moe_layers
    keep = random_keep(ckpt, 4, 0)
    submitted: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        ahead = ShardsAhead(ckpt, tmp_path / "run" / "shards", 4, "100KB", local_submit(pool, submitted))
        shards = len(ahead.layout)
        started = ahead.offer(first, keep[first])
        assert started == [i for i, layers in enumerate(ahead.layers) if layers <= {first}]
        assert any(not layers for layers in ahead.layers) and any(second in layers for layers in ahead.layers)
        assert ahead.offer(first, keep[first]) == []  # offered again (a restarted observe): nothing starts twice
        assert len(ahead.offer(second, keep[second])) >= writer.TAIL_SHARDS
        assert sorted(submitted) == list(range(shards))

        final = {**keep, second: random_keep(ckpt, 4, 1)[second]}  # layer 2 chosen again, differently
        assert final[second] != keep[second]
        res = write_pruned(ckpt, tmp_path / "ahead", final, max_shard_size="100KB", ahead=ahead)
    ref = write_pruned(ckpt, tmp_path / "after", final, max_shard_size="100KB")
    assert output(tmp_path / "ahead") == output(tmp_path / "after")
    assert res.written_ahead == [i for i, layers in enumerate(ahead.layers) if second not in layers]
    assert ref.written_ahead == [] and 0 < len(res.written_ahead) < shards
    assert sorted(ahead.times) == list(range(shards)) and all(a <= b for a, b in ahead.times.values())
    assert not (tmp_path / "run" / "shards").exists()
    pruning = json.loads((tmp_path / "ahead" / "pruning.json").read_text())
    assert pruning["shards"] == json.loads((tmp_path / "after" / "pruning.json").read_text())["shards"]  # sha256s


def test_a_failed_write_ahead_is_written_again_and_a_nonuniform_keep_writes_everything(tiny_models, tmp_path):
    ckpt = Checkpoint(tiny_models["qwen3_moe"])
    keep = random_keep(ckpt, 4, 2)
    submitted: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        ahead = ShardsAhead(ckpt, tmp_path / "run" / "shards", 4, "100KB", local_submit(pool, submitted, fail={0}))
        for layer, ids in keep.items():
            ahead.offer(layer, ids)
        res = write_pruned(ckpt, tmp_path / "a", keep, max_shard_size="100KB", ahead=ahead)
        assert 0 not in res.written_ahead and len(res.written_ahead) == len(ahead.layout) - 1

        nonuniform = {**keep, ckpt.moe_layers[0]: keep[ckpt.moe_layers[0]][:3]}
        ahead = ShardsAhead(ckpt, tmp_path / "run" / "shards", 4, "100KB", local_submit(pool, submitted))
        for layer, ids in nonuniform.items():
            ahead.offer(layer, ids)  # three experts: not the layout written ahead, ignored
        res = write_pruned(ckpt, tmp_path / "nu", nonuniform, max_shard_size="100KB", ahead=ahead, allow_nonuniform=True)
        assert res.written_ahead == []
    assert output(tmp_path / "a") == output(write_pruned(ckpt, tmp_path / "b", keep, max_shard_size="100KB").out)
    assert output(tmp_path / "nu") == output(write_pruned(ckpt, tmp_path / "nu2", nonuniform, max_shard_size="100KB",
                                                          allow_nonuniform=True).out)
    assert not (tmp_path / "run" / "shards").exists()

"""A stage whose layers do not all fit its device streams them when it takes a single wave: it holds a few at a
time, lets each go once the wave has passed it and its selection is done, and records and selects what a stage
holding every layer would (every family; the device memory given as ``memory_bytes``, on the CPU or a GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.coordinator import run
from actors.layer_shard import LayerShardWorker
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError
from mop_ray.plan import SELECT_SHARE, check_fits, stream_budget
from mop_ray.prune import layer_context

from conftest import FAMILIES, small_job
from test_observe import assert_same_records

LAYERS = 6  # enough that the two largest layers are well below all of them


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    """{family: path} of tiny random checkpoints with ``LAYERS`` decoder layers."""
    from transformers.utils import logging

    from mop_ray.zoo.tiny import build_tiny

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("deep")
    return {fam: build_tiny(fam, root / fam, num_hidden_layers=LAYERS) for fam in FAMILIES}


def least_memory(ckpt: Checkpoint, activation_bytes: int = 0) -> int:
    """The least device memory whose streaming budget holds a stage's two largest layers (first stage)."""
    two = sum(sorted(ckpt.resident_layer_bytes[i] for i in range(ckpt.num_layers))[-2:])
    need = two + ckpt.embed_bytes + activation_bytes
    return -(-need * SELECT_SHARE // (SELECT_SHARE - 1)) + SELECT_SHARE


def a_wave(n: int = 3):
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 100, (2, 32), generator=gen) for _ in range(n)]
    metas = [{"source": np.array([k % 2, 1]), "block": np.array([2 * k, 2 * k + 1]), "sample": np.ones((2, 32), bool)}
             for k in range(n)]
    return list(range(n)), ids, metas


def test_a_stage_taking_one_wave_streams_layers_larger_than_its_device(deep_models, family, tmp_path):
    streams_as_a_whole_stage_records(deep_models[family], tmp_path)


def test_a_stage_streams_block_fp8_layers_at_their_dequantized_size(deep_models, tmp_path):
    """DeepSeek-V3 as released (every decoder weight but the router's in block FP8): the budget counts the layers
    dequantized, as the stage holds them."""
    from test_fp8 import fp8_copy

    model = fp8_copy(deep_models["deepseek_v3"], tmp_path / "fp8", everything=True)
    ckpt = Checkpoint(model)
    assert all(ckpt.resident_layer_bytes[i] > ckpt.layer_bytes[i] for i in ckpt.moe_layers)
    streams_as_a_whole_stage_records(model, tmp_path)


def streams_as_a_whole_stage_records(model, tmp_path) -> None:
    """A stage given the least memory to stream ``model`` records and selects (mop, in the stage beside the wave)
    what a stage holding every layer does, holds at most its budget and lets every layer go."""
    ckpt = Checkpoint(model)
    layers = list(range(ckpt.num_layers))
    sizes = [ckpt.resident_layer_bytes[i] for i in layers]
    memory = least_memory(ckpt)
    ctxs = [layer_context(ckpt, i, 0, params={"enu_max_sets": 1}) for i in ckpt.moe_layers]
    r = ckpt.num_experts // 2
    mbs, ids, metas = a_wave()

    streamed = LayerShardWorker(str(model), layers, str(tmp_path / "streamed"), None, first_stage=True,
                                one_wave=True, memory_bytes=memory)
    streamed.begin(["code", "math"], select=(ctxs, "mop", r))
    streamed.forward_wave(mbs, ids, metas, last=True, final=True)
    assert set(streamed.finish()) == set(ckpt.moe_layers)
    got = streamed.select(ctxs, "mop", r)
    load = streamed.loaded()
    budget = load["stream_budget_gb"] * 1e9
    assert sum(sorted(sizes)[-2:]) <= budget < sum(sizes)  # streaming: the layers exceed what it may hold
    assert max(sizes) / 1e9 <= load["held_peak_gb"] <= load["stream_budget_gb"]
    assert streamed._let_go == set(layers) and not streamed._held  # every layer let go once passed and selected
    assert all(p.is_meta for layer in streamed.layers for p in layer.parameters())
    with pytest.raises(MopError, match="streams its layers .* takes a single final wave, not a second one"):
        streamed.forward_wave(mbs, ids, metas, last=True, final=True)

    whole = LayerShardWorker(str(model), layers, str(tmp_path / "whole"), ["code", "math"], first_stage=True)
    whole.forward_wave(mbs, ids, metas, last=True, final=True)
    whole.finish()
    want = whole.select(ctxs, "mop", r)
    assert whole.loaded()["stream_budget_gb"] == 0.0  # no one_wave: it holds every layer
    assert [(a[0], a[1]) for a in got] == [(b[0], b[1]) for b in want]
    np.testing.assert_allclose([a[2] for a in got], [b[2] for b in want], rtol=1e-9)
    assert_same_records(tmp_path / "streamed", tmp_path / "whole", ckpt.moe_layers, rtol=1e-9, atol=1e-6, rows=192)


def test_a_streaming_stage_selecting_after_the_wave_reads_each_layer_again(deep_models, tmp_path):
    """Without a selection at ``begin`` (``--select-after-observe``) every layer is let go as the wave passes it;
    ``select`` then reads each again, as a selection task would, and chooses what a stage holding them does."""
    model = deep_models["qwen2_moe"]
    ckpt = Checkpoint(model)
    layers = list(range(ckpt.num_layers))
    ctxs = [layer_context(ckpt, i, 0) for i in ckpt.moe_layers]
    r = ckpt.num_experts // 2
    mbs, ids, metas = a_wave()
    chosen = []
    for name, kw in (("streamed", {"one_wave": True, "memory_bytes": least_memory(ckpt)}), ("whole", {})):
        worker = LayerShardWorker(str(model), layers, str(tmp_path / name), ["code", "math"], first_stage=True, **kw)
        worker.forward_wave(mbs, ids, metas, last=True, final=True)
        worker.finish()
        chosen.append(worker.select(ctxs, "mop", r))
        if name == "streamed":
            assert worker._let_go == set(layers) and not worker._early
    assert [(a[0], a[1]) for a in chosen[0]] == [(b[0], b[1]) for b in chosen[1]]
    np.testing.assert_allclose([a[2] for a in chosen[0]], [b[2] for b in chosen[1]], rtol=1e-9)


def test_a_streaming_stage_refuses_a_wave_that_is_not_its_last(deep_models, tmp_path):
    model = deep_models["mixtral"]
    ckpt = Checkpoint(model)
    worker = LayerShardWorker(str(model), list(range(ckpt.num_layers)), str(tmp_path), ["code"], first_stage=True,
                              one_wave=True, memory_bytes=least_memory(ckpt))
    mbs, ids, metas = a_wave(1)
    with pytest.raises(MopError, match="takes a single final wave, not one wave of several"):
        worker.forward_wave(mbs, ids, metas, last=True, final=False)
    worker._loader.join()


def test_the_stream_budget_and_its_refusals(deep_models):
    """None where everything fits; the device less activations, embedding and a quarter otherwise; a one-line
    error below the two largest layers; a stage of several waves is refused as before, with the --waves 1 hint."""
    ckpt = Checkpoint(deep_models["deepseek_v3"])
    layers = list(range(ckpt.num_layers))
    sizes = [ckpt.resident_layer_bytes[i] for i in layers]
    total = sum(sizes) + ckpt.embed_bytes
    assert stream_budget(ckpt, layers, True, total + 1000, "G", 1000) is None
    memory = least_memory(ckpt, 1000)
    budget = stream_budget(ckpt, layers, True, memory, "G", 1000)
    assert budget == memory - 1000 - ckpt.embed_bytes - memory // SELECT_SHARE >= sum(sorted(sizes)[-2:])
    assert stream_budget(ckpt, layers[1:], False, memory, "G", 1000) == budget + ckpt.embed_bytes  # no embedding
    with pytest.raises(MopError, match=r"layers 0-5 streams its layers through its GPU \(G, .* its two largest "
                                       r"layers need .* use GPUs with more memory, or more stages — on fewer GPUs "
                                       r"they run in rounds \(`mop-ray plan --model M --gpu-memory 0.0 --gpus N`"):
        stream_budget(ckpt, layers, True, memory - 2 * SELECT_SHARE - 8, "G", 1000)
    with pytest.raises(MopError, match=r"pass --stages with that many .* or --waves 1 \(a stage that takes one wave "
                                       r"streams layers larger than its GPU\)"):
        check_fits(ckpt, layers, True, memory, "G")


def test_a_job_on_a_small_device_streams_its_one_stage_and_prunes_as_a_large_one(deep_models, tmp_path, ray_local):
    """``--stage-memory``: the job's one stage (one wave) streams its layers, selects each beside the wave and
    writes the checkpoint a stage holding every layer writes; a bad value fails before anything is written."""
    model = deep_models["mixtral"]
    ckpt = Checkpoint(model)
    gib = least_memory(ckpt, 1 << 20) / 2**30 * 1.05  # the plan's activations here are well below 1 MiB
    logs = []
    a = run(small_job(model, tmp_path / "a", method="mop", sample=100, stage_memory=gib), log=logs.append)
    b = run(small_job(model, tmp_path / "b", method="mop", sample=100), log=lambda *_: None)
    assert a["keep_map"] == b["keep_map"]
    phases = json.loads((tmp_path / "a.run" / "manifest.json").read_text())["phases"]
    load = phases["observe"]["placement"][0]["load"]
    held = sum(ckpt.resident_layer_bytes.values())
    assert 0 < load["stream_budget_gb"] * 1e9 < held and load["held_peak_gb"] * 1e9 < held
    assert phases["select"]["in"] == "stages"
    assert any(f"; streamed them, holding at most {load['held_peak_gb']:.1f} of {held / 1e9:.1f} GB at once" in m
               for m in logs)
    shards = sorted((tmp_path / "a").glob("*.safetensors"))
    assert shards and [s.name for s in shards] == sorted(s.name for s in (tmp_path / "b").glob("*.safetensors"))
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    with pytest.raises(MopError, match="--stage-memory -1: expected the GiB of device memory"):
        run(small_job(model, tmp_path / "c", stage_memory=-1), log=lambda *_: None)
    assert not (tmp_path / "c").exists()

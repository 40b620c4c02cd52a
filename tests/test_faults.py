"""Fault injection with real Ray: a stage process dies mid-observe, a writer task dies mid-write. The run
completes and its checkpoint is byte-identical to an undisturbed run with the same seed."""

from __future__ import annotations

import json

import numpy as np

from actors.coordinator import run
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.observe.records import STAT_FIELDS, read_stats

from conftest import small_job


def shard_bytes(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return index["weight_map"], {s: (out / s).read_bytes() for s in set(index["weight_map"].values())}


def test_stage_and_writer_crashes_are_survived(tiny_models, tmp_path, ray_local):
    model = tiny_models["deepseek_v3"]
    kw = dict(stages=2, tokens=16 * 32, micro_batch=2, max_shard_size="100KB")
    calm = run(small_job(model, tmp_path / "calm", **kw), log=lambda *_: None)
    logs = []
    env = {"MOP_RAY_FAULT_EXIT": f"2:3:{tmp_path / 'stage.marker'}",  # the stage holding layer 2 dies at micro-batch 3
           "MOP_RAY_FAULT_WRITE": f"1:{tmp_path / 'write.marker'}"}   # the task writing shard 2 dies once
    hit = run(small_job(model, tmp_path / "hit", extra={"fault_env": env}, **kw), log=logs.append)
    assert (tmp_path / "stage.marker").exists() and (tmp_path / "write.marker").exists()  # both faults happened
    assert any("restarting the phase" in line for line in logs)
    assert hit["keep_map"] == calm["keep_map"]
    for layer in Checkpoint(model).moe_layers:
        a, b = read_stats(tmp_path / "calm.run", layer), read_stats(tmp_path / "hit.run", layer)
        assert a.n_tokens == b.n_tokens == 512  # no micro-batch counted twice
        for f in STAT_FIELDS:
            np.testing.assert_allclose(a.by_source[f], b.by_source[f], rtol=1e-9, atol=1e-12)
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "hit")
    assert not list((tmp_path / "hit.run" / "records").glob("layer=*/.sample.*"))

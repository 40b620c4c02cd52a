"""The Ray calibration pipeline on every family: recorded outputs and statistics against straightforward references."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actors.coordinator import run, sample_mask
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError
from mop_ray.observe.records import STAT_FIELDS, read_sample, read_stats

from conftest import small_job


def reference(model_dir, run_dir):
    """Per-token loop over the unsplit transformers model on the recorded calibration blocks.

    Returns {layer: (Y [B, L, H], stats {field: [E]})} using the model's own router module for routing, where
    Y = Z − the shared-expert term: the block's routed output.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(pq.read_table(run_dir / "calib.parquet")["input_ids"].to_pylist())
    caught = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, (a[0], o)))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = {}
    for i, (x, z) in caught.items():
        moe = model.model.layers[i].mlp
        n = moe.experts.gate_up_proj.shape[0]
        stats = {f: np.zeros(n) for f in ("freq", "reap_sum", "ean_sum")}
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            _, weights, index = moe.gate(flat)
            for t in range(flat.shape[0]):
                w = weights[t].double() / weights[t].double().sum()
                for j, e in enumerate(index[t].tolist()):
                    gate, up = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
                    f = moe.experts.down_proj[e] @ (moe.experts.act_fn(gate) * up)
                    stats["freq"][e] += 1
                    stats["ean_sum"][e] += f.norm().item()
                    stats["reap_sum"][e] += w[j].item() * f.norm().item()
        with torch.no_grad():
            out[i] = (z - shared_term(moe, x), stats)
    return out


def shared_term(moe, x):
    """The shared-expert term a block adds (DeepSeek's shared experts, Qwen2-MoE's gated one), or 0."""
    if hasattr(moe, "shared_experts"):
        return moe.shared_experts(x)
    if hasattr(moe, "shared_expert"):
        return torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    return 0


def test_records_match_the_unsplit_model(tiny_models, family, tmp_path, ray_local):
    out = tmp_path / "out"
    res = run(small_job(tiny_models[family], out, stages=2), log=lambda *_: None)
    run_dir = tmp_path / "out.run"
    assert res["run_dir"] == str(run_dir)
    ref = reference(tiny_models[family], run_dir)
    assert sorted(ref) == Checkpoint(tiny_models[family]).moe_layers
    for layer, (y_ref, stats_ref) in ref.items():
        sample = read_sample(run_dir, layer)
        assert len(sample.block) == y_ref.shape[0] * y_ref.shape[1]  # all 256 tokens sampled
        y = y_ref[torch.as_tensor(sample.block, dtype=torch.long), torch.as_tensor(sample.pos, dtype=torch.long)]
        # 8 experts: each row's products (‖y‖² among them) stand in for its output z, which is not written
        assert sample.has_products and not sample.has_outputs
        np.testing.assert_allclose(sample.table["yy"].to_numpy(), y.double().pow(2).sum(-1).numpy(), rtol=1e-5)
        stats = read_stats(run_dir, layer)
        assert stats.n_tokens == 256 and sorted(stats.sources) == sorted(set(sample.source))
        np.testing.assert_array_equal(stats.total("freq"), stats_ref["freq"])
        np.testing.assert_allclose(stats.total("ean_sum"), stats_ref["ean_sum"], rtol=1e-5)
        np.testing.assert_allclose(stats.total("reap_sum"), stats_ref["reap_sum"], rtol=1e-5)
        assert stats.total("p_sum").sum() == pytest.approx(256)  # full softmax sums to 1 per token
    kept = json.loads((out / "pruning.json").read_text())["keep_map"]
    # a record-only method selects in the stages too, from the statistics they just wrote (no task to start)
    assert json.loads((run_dir / "manifest.json").read_text())["phases"]["select"]["in"] == "stages"
    for layer, (_, stats_ref) in ref.items():  # REAP keeps the 4 highest saliencies
        freq = np.maximum(stats_ref["freq"], 1)
        saliency = np.where(stats_ref["freq"] > 0, stats_ref["reap_sum"] / freq, 0)
        groups = 2 if family.startswith("deepseek") else 1
        size = 8 // groups
        expect = sorted(int(g * size + i) for g in range(groups)
                        for i in np.argsort(-saliency[g * size:(g + 1) * size], kind="stable")[: 4 // groups])
        assert kept[str(layer)] == expect


def products(sample) -> tuple[np.ndarray, np.ndarray]:
    """A sample's recorded per-row Grams [N, (E+2)²] and ‖y‖² [N]."""
    return sample.matrix("gram"), sample.table["yy"].to_numpy()


def assert_same_records(run_a, run_b, layers, rtol: float, atol: float, rows: int) -> None:
    """Two runs recorded the same statistics (to rtol) and the same sample rows (values to atol)."""
    for layer in layers:
        sa, sb = read_stats(run_a, layer), read_stats(run_b, layer)
        for f in STAT_FIELDS:
            np.testing.assert_allclose(sa.by_source[f], sb.by_source[f], rtol=rtol, atol=1e-12)
        xa, xb = read_sample(run_a, layer), read_sample(run_b, layer)
        assert len(xa.block) == rows
        np.testing.assert_array_equal(xa.block, xb.block)
        assert (xa.has_outputs, xa.has_products) == (xb.has_outputs, xb.has_products)
        for name in ("x", "logits") + (("z",) if xa.has_outputs else ()):
            np.testing.assert_allclose(xa.matrix(name), xb.matrix(name), rtol=0, atol=atol)
        if xa.has_products:  # inner products of values equal to atol: equal to atol relative to the largest
            for a, b in zip(products(xa), products(xb)):
                np.testing.assert_allclose(a, b, rtol=0, atol=atol * np.abs(a).max())


def test_one_and_three_stages_record_the_same(tiny_models, tmp_path, ray_local):
    model = tiny_models["deepseek_v3"]
    a = run(small_job(model, tmp_path / "a", stages=1, sample=100), log=lambda *_: None)
    b = run(small_job(model, tmp_path / "b", stages=3, sample=100), log=lambda *_: None)
    assert a["keep_map"] == b["keep_map"]
    assert_same_records(tmp_path / "a.run", tmp_path / "b.run", Checkpoint(model).moe_layers, rtol=1e-9, atol=1e-6, rows=100)
    placement = json.loads((tmp_path / "b.run" / "manifest.json").read_text())["phases"]["observe"]["placement"]
    assert [p["layers"] for p in placement] == [[0], [1], [2]]
    for p in placement:  # each stage's load timeline, in seconds
        assert {"config_s", "read_s", "read_wait_s", "build_s", "total_s"} <= set(p["load"])
        assert p["load"]["total_s"] > 0 and p["load"]["total_s"] >= max(p["load"]["build_s"], p["load"]["config_s"])


def test_the_pipeline_keeps_every_stage_a_wave_ahead():
    """Waves in flight: twice the stages (at least 4), so with 4 or 8 stages none waits for the driver's next wave
    (a fixed 4 left half of 8 stages idle); ``max_inflight`` overrides."""
    from actors.coordinator import inflight_limit

    assert [inflight_limit(small_job("m", "o"), s) for s in (1, 2, 3, 4, 8)] == [4, 4, 6, 8, 16]
    assert inflight_limit(small_job("m", "o", max_inflight=3), 8) == 3


def test_stages_in_rounds_record_and_select_what_they_would_all_at_once(tiny_models, tmp_path, ray_local):
    """Three stages one at a time (a model needing more GPUs than the cluster has): each round frees its stage and
    the next takes the waves' hidden states from the object store (the first round's stage starts before the
    calibration is tokenised); the records and the keep-map are those of the three stages at once, every layer
    selected in its stage before its round ended (no task reads a layer again) and every output shard started
    before the write phase."""
    model = tiny_models["deepseek_v3"]
    logs = []
    a = run(small_job(model, tmp_path / "a", stages=3, sample=100, method="mop"), log=lambda *_: None)
    b = run(small_job(model, tmp_path / "b", stages=3, sample=100, method="mop", stages_at_once=1), log=logs.append)
    assert a["keep_map"] == b["keep_map"]
    assert_same_records(tmp_path / "a.run", tmp_path / "b.run", Checkpoint(model).moe_layers, rtol=1e-9, atol=1e-6, rows=100)
    observe = json.loads((tmp_path / "b.run" / "manifest.json").read_text())["phases"]["observe"]
    assert observe["rounds"] == 3 and [p["layers"] for p in observe["placement"]] == [[0], [1], [2]]
    assert [m for m in logs if m.startswith("observe: round")] == [
        f"observe: round {r} of 3: layers {r - 1}-{r - 1} on 1 stage(s)" for r in (1, 2, 3)]
    assert any("in 3 rounds of 1" in m for m in logs)
    plan = next(k for k, m in enumerate(logs) if m.startswith("3 stage(s) for"))
    assert plan < next(k for k, m in enumerate(logs) if m.startswith("calibrate:"))  # round 1 loads meanwhile
    phases = json.loads((tmp_path / "b.run" / "manifest.json").read_text())["phases"]
    assert phases["select"]["in"] == "stages" and phases["select"]["scores"] == json.loads(
        (tmp_path / "a.run" / "manifest.json").read_text())["phases"]["select"]["scores"]
    assert phases["write"]["written_ahead"] == list(range(phases["write"]["shards"]))  # all before the write phase
    with pytest.raises(MopError, match="--stages-at-once 0: expected at least 1"):
        run(small_job(model, tmp_path / "c", stages=3, stages_at_once=0), log=lambda *_: None)


def test_sample_mask_is_uniform_and_reproducible():
    a, b = sample_mask(10, 64, 100, seed=3), sample_mask(10, 64, 100, seed=3)
    assert a.sum() == 100 and np.array_equal(a, b) and not np.array_equal(a, sample_mask(10, 64, 100, seed=4))
    assert sample_mask(2, 8, 1000, 0).all()


def test_resume_skips_recorded_layers_and_refuses_another_plan(tiny_models, tmp_path, ray_local):
    model = tiny_models["qwen2_moe"]
    run(small_job(model, tmp_path / "o", stages=2), log=lambda *_: None)
    run_dir = tmp_path / "o.run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stats0 = (run_dir / "records" / "layer=000" / "stats.parquet").stat().st_mtime_ns
    stats2 = (run_dir / "records" / "layer=002" / "stats.parquet").stat().st_mtime_ns
    del manifest["phases"]["observe"]["layers"]["2"]  # as if the run died before layer 2 was recorded
    del manifest["phases"]["select"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    logs = []
    res = run(small_job(model, tmp_path / "o", stages=2, resume=True), log=logs.append)
    assert any("calibrate: reusing" in line for line in logs)
    assert (run_dir / "records" / "layer=000" / "stats.parquet").stat().st_mtime_ns == stats0
    assert (run_dir / "records" / "layer=002" / "stats.parquet").stat().st_mtime_ns != stats2
    assert sorted(res["keep_map"]) == [0, 2]
    logs.clear()
    run(small_job(model, tmp_path / "o", stages=2, resume=True), log=logs.append)
    assert any("all layers recorded" in line for line in logs) and any("reusing the keep-map" in line for line in logs)
    from mop_ray.errors import MopError

    with pytest.raises(MopError, match="different plan"):
        run(small_job(model, tmp_path / "o", stages=2, resume=True, seed=9), log=lambda *_: None)


def test_prune_reap_end_to_end_from_the_command_line(tiny_models, tmp_path, ray_local):
    from transformers import AutoModelForCausalLM

    from mop_ray.cli import main

    out = tmp_path / "pruned"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {tiny_models['mixtral']}\nmethod: reap\ntokens: 256\nseq-len: 32\nmicro_batch: 2\n")
    assert main(["prune", "--config", str(cfg), "--out", str(out), "--keep", "6"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_local_experts == 6
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] >= 4
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["method"] == "reap" and pruning["parameters"]["tokens"] == 256
    assert set(pruning["timings"]) >= {"calibrate_s", "observe_s", "select_s", "write_s"}


def test_config_rejects_unknown_keys(tiny_models, tmp_path, capsys):
    from mop_ray.cli import main

    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: x\nkeeep: 4\n")
    assert main(["prune", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key 'keeep' (did you mean 'keep'?)" in capsys.readouterr().err


def test_a_bfloat16_stage_records_its_sample_as_exact_bfloat16_bits(tiny_models, tmp_path):
    from actors.layer_shard import LayerShardWorker

    model = tiny_models["qwen3_moe"]
    ckpt = Checkpoint(model)
    layer = ckpt.moe_layers[0]
    worker = LayerShardWorker(str(model), list(range(ckpt.num_layers)), str(tmp_path), ["code", "math"],
                              first_stage=True, dtype="bfloat16")
    seen = {}
    worker.layers[layer].mlp.register_forward_hook(
        lambda m, a, out: seen.update(x=a[0].reshape(-1, a[0].shape[-1]).detach().to("cpu", copy=True),
                                      z=out.reshape(-1, out.shape[-1]).detach().to("cpu", copy=True)))
    ids = torch.randint(0, 100, (2, 16))
    worker.forward(0, ids, {"source": np.array([0, 1]), "block": np.array([0, 1]), "sample": np.ones((2, 16), bool)})
    worker.finish()
    sample = read_sample(tmp_path, layer)
    assert seen["x"].dtype == torch.bfloat16 and sample.x.dtype == np.uint16 and not sample.has_outputs
    assert torch.equal(sample.tensor("x", dtype=torch.bfloat16), seen["x"])
    yy = torch.from_numpy(sample.table["yy"].to_numpy().copy())  # ‖z‖² of the bfloat16 output (no shared expert)
    assert torch.allclose(yy, seen["z"].float().pow(2).sum(-1).double(), rtol=1e-6, atol=0)


def test_waves_and_micro_batch_order_record_the_same(tiny_models, tmp_path, ray_local):
    """A stage taking all micro-batches layer by layer (one wave) records what micro-batch by micro-batch does."""
    model = tiny_models["olmoe"]
    a = run(small_job(model, tmp_path / "a", waves=1, sample=100), log=lambda *_: None)
    b = run(small_job(model, tmp_path / "b", waves=4, sample=100), log=lambda *_: None)
    assert a["keep_map"] == b["keep_map"]
    assert_same_records(tmp_path / "a.run", tmp_path / "b.run", Checkpoint(model).moe_layers, rtol=1e-12, atol=0, rows=100)


def test_a_stage_computes_its_first_layer_while_the_next_still_loads(tiny_models, tmp_path):
    """The stage's constructor returns at once; a wave runs layer 0 (its observer sees every token) while layer 1's
    read is held back, and finishes once it arrives."""
    import threading

    from actors.layer_shard import LayerShardWorker

    model = tiny_models["mixtral"]
    release, reading_1 = threading.Event(), threading.Event()

    class Held(LayerShardWorker):
        def _read(self, i):
            if i == 1:
                reading_1.set()
                assert release.wait(60)
            return super()._read(i)

    worker = Held(str(model), [0, 1], str(tmp_path), ["a"], first_stage=True)
    ids = torch.randint(0, 100, (2, 16))
    meta = {"source": np.array([0, 0]), "block": np.array([0, 1]), "sample": np.zeros((2, 16), bool)}
    out = {}
    t = threading.Thread(target=lambda: out.update(h=worker.forward_wave([0], [ids], [meta])))
    t.start()
    assert reading_1.wait(60)
    deadline = time.time() + 60
    while worker.observers[0].tokens.sum() < 32 and time.time() < deadline:  # layer 0 done, layer 1 still held
        time.sleep(0.05)
    assert worker.observers[0].tokens.sum() == 32 and worker.observers[1].tokens.sum() == 0 and t.is_alive()
    release.set()
    t.join(60)
    assert out["h"][0].shape == (2, 16, worker.ckpt.config["hidden_size"])
    assert worker.observers[1].tokens.sum() == 32
    worker.finish()


@pytest.mark.parametrize("family,params", [("mixtral", {}), ("deepseek_v3", {"enu_max_sets": 1})])
def test_a_stage_selects_a_layer_once_the_final_wave_has_passed_it(tiny_models, tmp_path, family, params):
    """Given a selection at ``begin``, the final wave closes the first MoE layer's records and selects it in the
    stage's worker thread while the last layer is still held loading; ``select`` returns that result, which
    equals a selection made after the whole observation (the stage's other path). ``enu_max_sets`` 1: MoP's
    general experts by greedy elimination (CUDA graphs on a GPU, captured in the worker thread)."""
    import threading

    from actors.layer_shard import LayerShardWorker
    from mop_ray.prune import layer_context

    model = tiny_models[family]
    ckpt = Checkpoint(model)
    layers, first, held = list(range(ckpt.num_layers)), ckpt.moe_layers[0], ckpt.moe_layers[-1]
    ctxs = [layer_context(ckpt, i, 0, params=params) for i in ckpt.moe_layers]
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 100, (2, 32), generator=gen) for _ in range(3)]
    metas = [{"source": np.array([k % 2, 1]), "block": np.array([2 * k, 2 * k + 1]), "sample": np.ones((2, 32), bool)}
             for k in range(3)]
    release = threading.Event()

    class Held(LayerShardWorker):
        def _read(self, i):
            if i == held:
                assert release.wait(60)
            return super()._read(i)

    early = Held(str(model), layers, str(tmp_path / "early"), None, first_stage=True)
    early.begin(["code", "math"], select=(ctxs, "mop", 4))
    t = threading.Thread(target=early.forward_wave, args=([0, 1, 2], ids, metas), kwargs={"last": True, "final": True})
    t.start()
    deadline = time.time() + 120
    while first not in early._early and time.time() < deadline:  # the wave has passed the layer: selection starts
        time.sleep(0.05)
    picked = early._early[first].result(120)  # selected while the last layer is still held
    assert picked is not None and picked[0] == first and len(picked[1]) == 4 and t.is_alive()
    release.set()
    t.join(120)
    assert set(early.finish()) == set(ckpt.moe_layers)
    got = early.select(ctxs, "mop", 4)

    late = LayerShardWorker(str(model), layers, str(tmp_path / "late"), ["code", "math"], first_stage=True)
    late.forward_wave([0, 1, 2], ids, metas, last=True)
    late.finish()
    want = late.select(ctxs, "mop", 4)
    assert [(a[0], a[1]) for a in got] == [(b[0], b[1]) for b in want]
    np.testing.assert_allclose([a[2] for a in got], [b[2] for b in want], rtol=1e-9)
    assert got[0] == picked


def test_observer_forward_equals_the_stock_block_and_its_statistics(tiny_models, family):
    """``MoEObserver.forward`` (the block's output from the all-experts pass, no top-k pass of its own) gives the
    stock transformers block's output and the same statistics and sample as observing that output; with an
    output budget too small for the micro-batch the stage runs the block itself (``fits`` is False)."""
    from mop_ray.arch.layer import build_layer
    from mop_ray import plan
    from mop_ray.observe.observer import MoEObserver

    ckpt = Checkpoint(tiny_models[family])
    moe = build_layer(ckpt, ckpt.moe_layers[0]).mlp
    spec = ckpt.family.router_spec(ckpt.config)
    x = torch.randn(64, int(ckpt.config["hidden_size"]), generator=torch.Generator().manual_seed(0))
    source, block, pos = torch.arange(64) % 2, torch.zeros(64, dtype=torch.long), torch.arange(64)
    ours, stock = (MoEObserver(0, ckpt.family, spec, ckpt.num_experts, 2, None) for _ in range(2))
    with torch.no_grad():
        z_stock = moe(x[None])[0]
    z = ours.forward(moe, x, source, None, block, pos)
    stock.observe(moe, x, z_stock, source, None, block, pos)
    assert torch.allclose(z, z_stock, rtol=1e-5, atol=1e-6)
    for name in STAT_FIELDS:
        assert np.allclose(ours.stats[name], stock.stats[name], rtol=1e-4, atol=1e-6), name
    assert ours.fits(x)
    budget = plan.OUTPUTS_BUDGET
    try:
        plan.OUTPUTS_BUDGET = 0
        assert not ours.fits(x)
    finally:
        plan.OUTPUTS_BUDGET = budget


def test_the_observer_takes_the_micro_batchs_device_copies_of_source_and_sample_rows(tiny_models, tmp_path):
    """On a GPU ``token_meta`` copies the source ids and the sample's row indices to the device once per micro-batch
    (from pinned memory: a copy from pageable memory in every layer synchronised the stream); the observer uses
    those copies (both paths, ``forward`` and ``observe``), and the same copies record the same as its own."""
    from mop_ray.arch.layer import build_layer
    from mop_ray.observe.observer import MoEObserver, token_meta
    from mop_ray.observe.records import SampleWriter, layer_dir

    ckpt = Checkpoint(tiny_models["qwen2_moe"])  # a shared expert: every part of the block's output
    moe = build_layer(ckpt, ckpt.moe_layers[0]).mlp
    spec = ckpt.family.router_spec(ckpt.config)
    meta = token_meta(np.array([0, 1]), np.array([3, 4]), 16, np.arange(32).reshape(2, 16) % 3 == 0)
    assert "device" not in meta  # only with a CUDA device
    x = torch.randn(32, int(ckpt.config["hidden_size"]), generator=torch.Generator().manual_seed(0))
    rows = meta["sample"].nonzero().squeeze(1)
    cases = {"own": None, "copies": {"source": meta["source"].clone(), "rows": rows.clone()},
             "all-source-0": {"source": torch.zeros_like(meta["source"]), "rows": rows.clone()},
             "rows-reversed": {"source": meta["source"].clone(), "rows": rows.flip(0)}}
    got = {}
    for name, on_device in cases.items():
        for path in ("forward", "observe"):
            writer = SampleWriter(layer_dir(tmp_path / name / path, 0), ["a", "b"])
            obs = MoEObserver(0, ckpt.family, spec, ckpt.num_experts, 2, writer)
            args = (meta["source"], meta["sample"], meta["block"], meta["pos"], on_device)
            with torch.no_grad():
                if path == "forward":
                    obs.forward(moe, x, *args)
                else:
                    obs.observe(moe, x, moe(x[None])[0], *args)
            writer.close()
            got[name, path] = obs.stats, read_sample(tmp_path / name / path, 0)
    for path in ("forward", "observe"):
        (own, own_rows), (copied, copied_rows) = got["own", path], got["copies", path]
        assert own_rows.x.shape == (len(rows), x.shape[1])
        np.testing.assert_array_equal(copied_rows.x, own_rows.x)
        for f in STAT_FIELDS:
            np.testing.assert_array_equal(copied[f], own[f], err_msg=f)
        moved = got["all-source-0", path][0]  # the copies, not the host ids, decide each token's source
        assert (moved["freq"][1] == 0).all() and moved["freq"][0].sum() == own["freq"].sum() > 0
        np.testing.assert_array_equal(got["rows-reversed", path][1].x, own_rows.x[::-1])  # and the copied rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="token_meta copies to the device only on a GPU")
def test_token_meta_copies_the_source_ids_and_sample_rows_to_the_gpu():
    from mop_ray.observe.observer import token_meta

    sample = np.arange(16).reshape(2, 8) % 3 == 0
    meta = token_meta(np.array([2, 0]), np.array([5, 6]), 8, sample, torch.device("cuda", 0))
    on = meta["device"]
    assert on["source"].is_cuda and on["rows"].is_cuda and on["source"].dtype == torch.long
    assert torch.equal(on["source"].cpu(), meta["source"])
    assert torch.equal(on["rows"].cpu(), torch.from_numpy(np.flatnonzero(sample)))


def test_a_stage_records_the_same_whether_the_observer_or_the_block_computes_the_output(tiny_models, tmp_path,
                                                                                         monkeypatch):
    """Experts whose outputs exceed the observer's budget leave the block's own forward in place (the stage's
    other path): both paths record the same sample and statistics (float32 model: up to rounding)."""
    from actors.layer_shard import LayerShardWorker
    from mop_ray import plan

    model = tiny_models["deepseek_v3"]
    ckpt = Checkpoint(model)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    meta = {"source": np.array([0, 1]), "block": np.array([0, 1]), "sample": np.ones((2, 16), bool)}
    outs = {}
    for name, budget in (("observer", plan.OUTPUTS_BUDGET), ("block", 0)):
        monkeypatch.setattr(plan, "OUTPUTS_BUDGET", budget)
        worker = LayerShardWorker(str(model), list(range(ckpt.num_layers)), str(tmp_path / name), ["code", "math"],
                                  first_stage=True)
        worker.forward(0, ids, meta)
        worker.finish()
        outs[name] = {i: (read_sample(tmp_path / name, i), read_stats(tmp_path / name, i)) for i in ckpt.moe_layers}
    for i in ckpt.moe_layers:
        (sa, ta), (sb, tb) = outs["observer"][i], outs["block"][i]
        np.testing.assert_allclose(sa.x, sb.x, rtol=1e-5, atol=1e-6)
        for a, b in zip(products(sa), products(sb)):  # the rows' products (from either path's outputs) stand in for z
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
        for f in STAT_FIELDS:
            np.testing.assert_allclose(ta.by_source[f], tb.by_source[f], rtol=1e-4, atol=1e-6)


def test_a_stage_too_large_for_its_gpu_fails_before_reading_a_layer(tiny_models, tmp_path, monkeypatch):
    """The loader checks its layers against the GPU's memory first (here a pretended 1 MB GPU): the waves get the
    plan's MopError at once, and no layer has been read."""
    import actors.layer_shard as layer_shard
    from actors.layer_shard import LayerShardWorker
    from mop_ray.errors import MopError

    model = tiny_models["mixtral"]
    monkeypatch.setattr(layer_shard, "device_memory", lambda device: (10**6, "a 1 MB GPU"))
    worker = LayerShardWorker(str(model), [0, 1], str(tmp_path), ["code"], first_stage=True)
    with pytest.raises(MopError, match=r"layers 0-1 needs .* its GPU \(a 1 MB GPU\) has 0.0 GB"):
        worker.forward(0, torch.zeros(1, 8, dtype=torch.long), {"source": np.zeros(1, int), "block": np.arange(1),
                                                                "sample": np.zeros((1, 8), bool)})
    worker._loader.join()
    assert worker.load_times["read_s"] == 0.0 and "prefetched_gb" not in worker.load_times  # no read, no read-ahead
    assert all(isinstance(f.exception(), MopError) for f in worker._built)


def test_finish_refuses_to_write_records_after_a_failed_or_missing_wave(tiny_models, tmp_path, monkeypatch):
    """``finish(expect_waves)`` (the rounds, which do not fetch their waves' results) raises a wave's own error, or
    says how many waves went through, and writes no statistics."""
    import actors.layer_shard as layer_shard
    from actors.layer_shard import LayerShardWorker
    from mop_ray.errors import MopError

    model = tiny_models["mixtral"]
    idle = LayerShardWorker(str(model), [0, 1], str(tmp_path / "idle"), ["code"], first_stage=True)
    with pytest.raises(MopError, match="layers 0-1: 0 of 2 waves went through"):
        idle.finish(expect_waves=2)

    failed = LayerShardWorker(str(model), [0, 1], str(tmp_path / "failed"), ["code"], first_stage=True)
    monkeypatch.setattr(layer_shard, "token_meta", lambda *a: (_ for _ in ()).throw(MopError("a bad micro-batch")))
    with pytest.raises(MopError, match="a bad micro-batch"):
        failed.forward(0, torch.zeros(1, 8, dtype=torch.long), {"source": np.zeros(1, int), "block": np.arange(1),
                                                                "sample": np.zeros((1, 8), bool)})
    with pytest.raises(MopError, match="a bad micro-batch"):
        failed.finish(expect_waves=1)
    assert not list((tmp_path / "failed").rglob("stats.parquet")) and not list((tmp_path / "idle").rglob("stats.parquet"))

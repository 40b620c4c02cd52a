"""Calibration specs with `datasets`, the Parquet record schema, and the stage plan."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.data.calib import DOMAINS, block_counts, build_calibration, parse_spec
from mop_ray.errors import MopError
from mop_ray.observe.records import STAT_FIELDS, SampleWriter, bf16_bits, decode_rows, read_sample, read_stats, write_stats
from mop_ray.plan import _split, check_fits, plan_stages


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["mixtral"])


def test_default_mixture_packs_every_domain(tokenizer, tmp_path):
    out = tmp_path / "calib.parquet"
    ds = build_calibration("default", tokenizer, tokens=12 * 64, seq_len=64, seed=0, out=out)
    assert len(ds) == 12 and {len(r) for r in ds["input_ids"]} == {64}
    assert sorted(set(ds["source"])) == sorted(DOMAINS)
    table = pq.read_table(out)
    assert table.column_names == ["input_ids", "source"] and table.num_rows == 12
    again = build_calibration("default", tokenizer, tokens=12 * 64, seq_len=64, seed=0)
    assert again["input_ids"] == ds["input_ids"]  # reproducible from the seed


def test_files_folders_and_mixture_yaml(tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "poems.txt").write_text("\n".join(f"line {i} of a poem about the sea" for i in range(400)))
    with gzip.open(data / "code.jsonl.gz", "wt") as f:
        for i in range(200):
            f.write(json.dumps({"body": f"def f{i}(x):\n    return x * {i}\n"}) + "\n")
    assert [s.name for s in parse_spec(str(data))] == ["code", "poems"]
    ds = build_calibration(str(data / "poems.txt"), tokenizer, tokens=4 * 32, seq_len=32)
    assert set(ds["source"]) == {"poems"}
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - {path: data/poems.txt, weight: 3}\n"
                   "  - {name: code, path: data/code.jsonl.gz, text_field: body, weight: 1}\n"
                   "  - {default: math, weight: 2}\n")
    ds = build_calibration(str(mix), tokenizer, tokens=12 * 32, seq_len=32)
    counts = {s: ds["source"].count(s) for s in set(ds["source"])}
    assert counts == {"poems": 6, "code": 2, "math": 4}


def test_block_counts_follow_weights():
    from mop_ray.data.calib import Source

    srcs = [Source("a", "file", "a", 1), Source("b", "file", "b", 1), Source("c", "file", "c", 2)]
    assert block_counts(srcs, 8) == [2, 2, 4] and sum(block_counts(srcs, 7)) == 7


@pytest.mark.parametrize("spec,expect", [
    ("allenai/c4", "offline"),
    ("./missing.jsonl", "no such file"),
])
def test_bad_calibration_specs(tokenizer, spec, expect):
    with pytest.raises(MopError, match=expect):
        build_calibration(spec, tokenizer, tokens=256, seq_len=32)


def test_bad_mixture_yaml(tokenizer, tmp_path):
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - {default: math, wieght: 2}\n")
    with pytest.raises(MopError, match="unknown keys"):
        parse_spec(str(mix))
    mix.write_text("sources:\n  - {default: poetry}\n")
    with pytest.raises(MopError, match="unknown domain"):
        parse_spec(str(mix))
    with pytest.raises(MopError, match="blocks of"):
        build_calibration("default", tokenizer, tokens=4 * 32, seq_len=32)  # fewer blocks than sources


def test_records_round_trip_through_parquet(tmp_path):
    rng = np.random.default_rng(0)
    sources = ["code", "math"]
    stats = {f: rng.random((2, 8)) for f in STAT_FIELDS}
    layer = tmp_path / "records" / "layer=007"
    write_stats(layer, sources, np.array([10, 20]), stats)
    back = read_stats(tmp_path, 7)
    assert back.sources == sources and back.tokens.tolist() == [10, 20] and back.n_experts == 8
    for f in STAT_FIELDS:
        np.testing.assert_array_equal(back.by_source[f], stats[f])
    (layer / ".sample.999999.arrow").write_bytes(b"partial")  # an earlier attempt's (lost stage, full disk): removed
    writer = SampleWriter(layer, sources)
    x, z, lg = rng.random((5, 16)).astype(np.float32), rng.random((5, 16)).astype(np.float32), rng.random((5, 8)).astype(np.float32)
    for part in (slice(0, 2), slice(2, 5)):
        writer.write(x[part], z[part], lg[part], np.array([0, 1, 1, 0, 1])[part], np.arange(5)[part], np.arange(5)[part] * 3)
    writer.close()
    assert sorted(p.name for p in layer.iterdir()) == ["sample.arrow", "stats.parquet"]
    s = read_sample(tmp_path, 7)
    np.testing.assert_array_equal(s.x, x)
    np.testing.assert_array_equal(s.z, z)
    np.testing.assert_array_equal(s.logits, lg)
    assert torch.equal(s.tensor("x"), torch.from_numpy(x)) and len(s) == 5
    batches = s.batches("z")  # one per write, views of the mapped file: a GPU copy starts from them, not from s.z
    assert [b.shape for b in batches] == [(2, 16), (3, 16)] and not any(b.flags.writeable for b in batches)
    assert torch.equal(decode_rows(batches), torch.from_numpy(z))

    # a bfloat16 layer's rows are stored as their bits (uint16, half the bytes) and decode exactly
    xb = (torch.randn(5, 16) * 1e3).to(torch.bfloat16)
    zb = torch.tensor([[0.0, -0.0, float("inf"), 1e-40] * 4] * 5).to(torch.bfloat16)  # signs, inf, subnormals
    other = tmp_path / "records" / "layer=008"
    writer = SampleWriter(other, sources)
    writer.write(bf16_bits(xb), bf16_bits(zb), lg, np.array([0, 1, 1, 0, 1]), np.arange(5), np.arange(5))
    writer.close()
    sb = read_sample(tmp_path, 8)
    assert sb.x.dtype == np.uint16 and (other / "sample.arrow").stat().st_size < (layer / "sample.arrow").stat().st_size
    assert torch.equal(sb.tensor("x"), xb.float()) and torch.equal(sb.tensor("z"), zb.float())
    assert torch.equal(sb.tensor("z", dtype=torch.bfloat16).view(torch.int16), zb.view(torch.int16))
    assert torch.equal(decode_rows(sb.batches("x")), xb.float())
    assert s.source == ["code", "math", "math", "code", "math"] and s.pos.tolist() == [0, 3, 6, 9, 12]


def test_stage_plan_balances_bytes(tiny_models):
    assert _split([1, 10, 10, 10, 10, 1, 1], 3) == [[0, 1], [2, 3], [4, 5, 6]]
    ckpt = Checkpoint(tiny_models["qwen2_moe"])  # layer 1 is dense and small
    stages = plan_stages(ckpt, 2)
    assert [s.layers for s in stages] in ([(0,), (1, 2)], [(0, 1), (2,)])
    assert sum(s.weight_bytes for s in stages) == sum(ckpt.layer_bytes.values()) + ckpt.tensors["model.embed_tokens.weight"].nbytes
    with pytest.raises(MopError, match="between 1 and"):
        plan_stages(ckpt, 4)


def test_a_stage_whose_weights_exceed_its_gpu_is_refused_with_the_gpus_the_model_needs(tiny_models):
    ckpt = Checkpoint(tiny_models["mixtral"])
    layers = list(range(ckpt.num_layers))
    need = sum(ckpt.resident_layer_bytes.values()) + ckpt.embed_bytes
    check_fits(ckpt, layers, True, need, "a GPU")  # exactly enough: no error
    check_fits(ckpt, layers[1:], False, need - ckpt.embed_bytes - ckpt.resident_layer_bytes[0], "a GPU")
    with pytest.raises(MopError) as e:
        check_fits(ckpt, layers, True, need // 3, "NVIDIA Test 1GB")
    msg = str(e.value)
    assert f"layers 0-{layers[-1]}" in msg and "NVIDIA Test 1GB" in msg and "\n" not in msg
    assert f"need at least {-(-(need * 11 // 10) // (need // 3))} such GPUs" in msg  # 1.1x the weights, rounded up
    with pytest.raises(MopError, match="layers 1-1 needs"):  # a later stage: no embedding in its weights
        check_fits(ckpt, [1], False, ckpt.resident_layer_bytes[1] - 1, "a GPU")


def test_plan_command(tiny_models, capsys):
    from mop_ray.cli import main

    assert main(["plan", "--model", str(tiny_models["deepseek_v3"]), "--stages", "2", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in stages] == [[0, 1], [2]] and all(s["memory_bytes"] > s["weight_bytes"] for s in stages)

    def one_stage_memory(*flags):
        assert main(["plan", "--model", str(tiny_models["mixtral"]), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)[0]["memory_bytes"]

    hidden = Checkpoint(tiny_models["mixtral"]).config["hidden_size"]
    small, big = one_stage_memory("--tokens", "16384"), one_stage_memory("--tokens", "65536")
    assert big - small == (65536 - 16384) * hidden * 4  # one wave: every calibration token's hidden state
    assert one_stage_memory("--tokens", "65536", "--waves", "4") == small  # a quarter of them per wave


def test_plan_for_a_gpu_size_takes_the_fewest_stages_that_fit(tiny_models, capsys):
    from pathlib import Path

    from mop_ray.checkpoint.writer import human_size
    from mop_ray.cli import main

    model = str(tiny_models["deepseek_v3"])

    def largest(n):  # the largest stage memory estimate of the --stages n plan (plan's defaults)
        assert main(["plan", "--model", model, "--stages", str(n), "--json"]) == 0
        return max(s["memory_bytes"] for s in json.loads(capsys.readouterr().out))

    one, two, three = largest(1), largest(2), largest(3)
    assert one > two > three
    for budget, want in ((one, 1), (one - 1, 2), (two, 2), (two - 1, 3), (three, 3)):
        assert main(["plan", "--model", model, "--gpu-memory", repr(budget / 2**30), "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == want, (budget, want)
    assert main(["plan", "--model", model, "--gpu-memory", repr(two / 2**30)]) == 0
    assert capsys.readouterr().out.startswith("fewest stages whose memory estimates fit a ")
    # the public shapes: one stage streams Mixtral-8x7B through an H100; DeepSeek-V3's two largest layers do not fit
    shapes = Path(__file__).parent.parent / "configs" / "shapes"
    h100 = ["--shape-only", "--gpu-memory", "79.2"]
    assert main(["plan", "--model", str(shapes / "mixtral-8x7b.json"), *h100]) == 0
    out = capsys.readouterr().out
    assert "fit a 79.2 GiB (85.0 GB) GPU: 2, one GPU each" in out
    assert ("or 1 stage on one such GPU: it takes one wave and streams its layers, holding at most 57.6 GB of them "
            "at once") in out
    assert main(["plan", "--model", str(shapes / "mixtral-8x7b.json"), *h100, "--waves", "2"]) == 0
    assert "one stage would take several waves (--waves): it cannot stream its layers" in capsys.readouterr().out
    assert main(["plan", "--model", str(shapes / "deepseek-v3.json"), *h100]) == 0
    assert ("one stage cannot stream them through one such GPU: the stage holding layers 0-60 streams its layers "
            "through its GPU (79.2 GiB GPU, 85.0 GB) but its two largest layers need 46.0 GB") in capsys.readouterr().out
    assert main(["plan", "--model", model, "--gpu-memory", repr((three - 1) / 2**30)]) == 2
    assert "no plan fits a 0.0 GiB GPU: even one layer per stage needs up to" in capsys.readouterr().err
    assert main(["plan", "--model", model, "--gpu-memory", "-1"]) == 2
    assert "--gpu-memory -1: expected the GPU's memory in GiB" in capsys.readouterr().err

    # on fewer GPUs than stages: the rounds, each taking its own waves (one stage at a time: one wave, larger)
    assert main(["plan", "--model", model, "--stages", "3", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "on 2 GPU(s): 2 rounds of 2, 1 stages" in out
    one = 262144 * Checkpoint(model).config["hidden_size"] * 4  # one boundary: every token's hidden state, float32
    assert f"the hidden states between rounds take up to {human_size(one)} of disk" in out
    assert main(["plan", "--model", model, "--stages", "3", "--gpus", "1"]) == 0  # 3 rounds: two boundaries at once
    assert f"take up to {human_size(2 * one)} of disk" in capsys.readouterr().out
    assert main(["plan", "--model", model, "--stages", "3", "--gpus", "1", "--json"]) == 0
    assert max(s["memory_bytes"] for s in json.loads(capsys.readouterr().out)) > three
    assert main(["plan", "--model", model, "--gpu-memory", repr(three / 2**30), "--gpus", "1", "--json"]) == 2
    assert main(["plan", "--model", model, "--stages", "3", "--gpus", "0"]) == 2
    assert "--gpus 0: expected the GPUs the stages run on, at least 1" in capsys.readouterr().err


def test_shipped_configs_use_known_keys(tmp_path):
    import argparse
    from pathlib import Path

    from mop_ray.cli import PRUNE_DEFAULTS, apply_config

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert configs
    for cfg in configs:
        args = argparse.Namespace(config=str(cfg), model="m", out="o", **{k: None for k in PRUNE_DEFAULTS})
        args = apply_config(args)
        from mop_ray.methods import methods

        assert args.keep and args.method in methods(), cfg.name


def test_shipped_configs_fit_their_stated_clusters():
    """Every job config plans within 60 GB of weights per stage on its model's shapes (configs/shapes/)."""
    import argparse
    from pathlib import Path

    from mop_ray.checkpoint.keepmap import check_r
    from mop_ray.cli import PRUNE_DEFAULTS, apply_config
    from mop_ray.shapes import ShapeOnly

    root = Path(__file__).parent.parent / "configs"
    for cfg in sorted(root.glob("*.yaml")):
        shape = ShapeOnly(root / "shapes" / (cfg.stem.rsplit("-r", 1)[0] + ".json"))
        args = apply_config(argparse.Namespace(config=str(cfg), model="m", out="o", **{k: None for k in PRUNE_DEFAULTS}))
        check_r(shape, args.keep)
        stages = plan_stages(shape, args.stages)
        assert max(s.weight_bytes for s in stages) <= 60e9, cfg.name


def test_waves_cover_the_micro_batches_in_order_within_the_memory_bound():
    from mop_ray.plan import WAVE_BYTES, plan_waves

    assert plan_waves(32, 1, 1 << 20) == [list(range(32))]  # one stage: one wave, its loading overlaps compute
    two = plan_waves(32, 2, 1 << 20)  # several stages: 4 waves per stage keep the pipeline full
    assert len(two) == 8 and [mb for w in two for mb in w] == list(range(32)) and {len(w) for w in two} == {4}
    big = plan_waves(10, 1, WAVE_BYTES // 3)  # at most 3 micro-batches' hidden states per wave
    assert [len(w) for w in big] == [3, 3, 2, 2] and [mb for w in big for mb in w] == list(range(10))
    assert plan_waves(3, 4, 1) == [[0], [1], [2]] and plan_waves(0, 1, 1) == []
    assert plan_waves(5, 1, 1, waves=2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(MopError, match="--waves 0"):
        plan_waves(5, 1, 1, waves=0)


def test_the_records_size_estimate_matches_what_the_observer_writes(tiny_models, records, family):
    """``sample_row_bytes`` (which the disk-space check before a run multiplies out) against the columns the
    observer wrote for every MoE layer: never under, at most the source-name allowance over."""
    from mop_ray.arch.layer import compute_dtype
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.observe.records import SOURCE_NAME_BYTES, read_sample, sample_row_bytes

    ckpt = Checkpoint(tiny_models[family])
    for i in ckpt.moe_layers:
        sample = read_sample(records(family), i)
        dtype = compute_dtype(ckpt, [n for n in ckpt.tensors if ckpt.layer_of(n) == i])
        estimate = len(sample) * sample_row_bytes(int(ckpt.config["hidden_size"]), ckpt.num_experts, dtype)
        written = sample.table.nbytes
        assert written <= estimate <= written + len(sample) * SOURCE_NAME_BYTES, (i, written, estimate)

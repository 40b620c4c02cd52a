"""Pruned checkpoints of every family load in stock transformers and equal the source pruned in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.cli import main
from mop_ray.prune import prune

KEEP = 4  # 8 -> 4, two per routing group where DeepSeek groups apply


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def prune_in_memory(model, keep_map):
    """The reference: slice the fused expert tensors, router rows and correction bias in a loaded model."""
    for i, layer in enumerate(model.model.layers):
        moe = layer.mlp
        if not hasattr(moe, "experts"):
            continue
        keep = torch.tensor(keep_map[str(i)])
        moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj.index_select(0, keep).clone())
        moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj.index_select(0, keep).clone())
        moe.experts.num_experts = len(keep)
        moe.gate.weight = torch.nn.Parameter(moe.gate.weight.index_select(0, keep).clone())
        moe.gate.num_experts = len(keep)
        if getattr(moe.gate, "e_score_correction_bias", None) is not None:
            moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.index_select(0, keep).clone()
    return model


def test_pruned_checkpoint_loads_generates_and_matches_in_memory_pruning(tiny_models, family, tmp_path):
    src = tiny_models[family]
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--out", str(out), "--method", "random", "--keep", str(KEEP),
                 "--seed", "3", "--max-shard-size", "100KB"]) == 0
    pruning = json.loads((out / "pruning.json").read_text())
    keep_map = pruning["keep_map"]
    ckpt = Checkpoint(src)
    assert sorted(map(int, keep_map)) == ckpt.moe_layers
    assert all(len(v) == KEEP and v == sorted(v) for v in keep_map.values())

    pruned = load(out)
    reference = prune_in_memory(load(src), keep_map)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (pruned(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5
    gen = pruned.generate(ids[:1, :6], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 11)

    # config: the original dict with only the family's count key changed (and DeepSeek MTP disabled)
    before, after = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    changed = {k for k in before if before[k] != after.get(k)} | (set(after) - set(before))
    count_key = next(k for k in ckpt.family.count_keys if k in before)  # whichever key the source uses
    assert after[count_key] == KEEP
    assert changed == ({count_key, "num_nextn_predict_layers"} if family == "deepseek_v3" else {count_key})

    # shards, index and files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert total == index["metadata"]["total_size"] == pruning["bytes_after"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert pruning["method"] == "random" and pruning["experts_after"] == KEEP and "transformers" in pruning["versions"]
    assert not any(n.startswith("model.layers.3.") for n in index["weight_map"]) or family != "deepseek_v3"
    assert not list(tmp_path.glob(".pruned.tmp-*"))


def test_kept_experts_are_renumbered_and_routers_sliced(tiny_models, tmp_path):
    src = tiny_models["deepseek_v3"]
    keep = {"1": [1, 3, 4, 6], "2": [0, 2, 5, 7]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(src), "--out", str(out), "--keep-map", str(tmp_path / "keep.json")]) == 0
    s, o = Checkpoint(src), Checkpoint(out)

    def tensor(ckpt, name):
        info = ckpt.tensors[name]
        with safe_open(info.path, "pt") as f:
            return f.get_tensor(name)

    for layer, ids in keep.items():
        for new, old in enumerate(ids):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                a = tensor(s, f"model.layers.{layer}.mlp.experts.{old}.{proj}.weight")
                b = tensor(o, f"model.layers.{layer}.mlp.experts.{new}.{proj}.weight")
                assert torch.equal(a, b)
        for suffix in ("weight", "e_score_correction_bias"):
            full = tensor(s, f"model.layers.{layer}.mlp.gate.{suffix}")
            assert torch.equal(tensor(o, f"model.layers.{layer}.mlp.gate.{suffix}"), full[ids])
        assert f"model.layers.{layer}.mlp.experts.4.gate_proj.weight" not in o.tensors
    shared = "model.layers.1.mlp.shared_experts.up_proj.weight"
    assert torch.equal(tensor(s, shared), tensor(o, shared))
    assert o.mtp_layers == [] and o.config["num_nextn_predict_layers"] == 0


def test_keep_map_from_an_earlier_pruning_json_reproduces_the_checkpoint(tiny_models, tmp_path):
    first = prune(tiny_models["qwen3_moe"], tmp_path / "a", keep=4, seed=7)
    again = prune(tiny_models["qwen3_moe"], tmp_path / "b", keep_map_file=first.out / "pruning.json")
    idx_a = json.loads((first.out / "model.safetensors.index.json").read_text())
    idx_b = json.loads((again.out / "model.safetensors.index.json").read_text())
    assert idx_a == idx_b
    for shard in set(idx_a["weight_map"].values()):
        assert (first.out / shard).read_bytes() == (again.out / shard).read_bytes()


def test_fused_on_disk_experts_are_sliced_too(tiny_models, tmp_path):
    """Checkpoints saved with save_original_format=False store experts fused; they prune the same way."""
    model = load(tiny_models["olmoe"])
    fused = tmp_path / "fused"
    model.save_pretrained(fused, save_original_format=False, max_shard_size="100KB")
    keep = {str(i): [0, 3, 5, 6] for i in range(3)}
    (tmp_path / "k.json").write_text(json.dumps(keep))
    assert main(["prune", "--model", str(fused), "--out", str(tmp_path / "o"), "--keep-map", str(tmp_path / "k.json")]) == 0
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (load(tmp_path / "o")(ids).logits - prune_in_memory(model, keep)(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_overwrite_replaces_an_existing_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["prune", "--model", str(tiny_models["mixtral"]), "--out", str(out), "--keep", "6", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "pruning.json").exists()


def test_inspect_reports_family_layers_and_bytes(tiny_models, capsys):
    assert main(["inspect", "--model", str(tiny_models["qwen2_moe"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2_moe" and info["moe_layers"] == [0, 2] and info["dense_layers"] == [1]
    assert info["experts"] == 8 and info["top_k"] == 2 and info["shared_experts"] == ["shared_expert", "shared_expert_gate"]
    assert info["bytes_per_layer"]["0"] > info["bytes_per_layer"]["1"]
    assert main(["inspect", "--model", str(tiny_models["deepseek_v3"])]) == 0
    text = capsys.readouterr().out
    assert "deepseek_v3" in text and "MTP" in text and "2 groups" in text


def test_console_script_is_installed(tiny_models, tmp_path):
    exe = [sys.executable, "-m", "mop_ray.cli"]
    res = subprocess.run(exe + ["prune", "--model", str(tiny_models["mixtral"]), "--out", str(tmp_path / "o"),
                                "--keep", "4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and (tmp_path / "o" / "config.json").exists()


def test_verify_checks_checksums_and_index(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_models["qwen2_moe"]), "--out", str(out), "--keep", "4",
                 "--max-shard-size", "100KB"]) == 0
    pruning = json.loads((out / "pruning.json").read_text())
    assert len(pruning["shards"]) > 1
    assert main(["verify", str(out)]) == 0
    assert f"{len(pruning['shards'])} sha256 checked" in capsys.readouterr().out
    shard = out / sorted(pruning["shards"])[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip one bit of tensor data: headers still parse
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 2
    assert "sha256 differs" in capsys.readouterr().err


def test_write_shard_streams_pieces_across_chunks_and_reports_a_short_source(tmp_path, monkeypatch):
    """The threaded copy (read ahead, write, hash) writes tensors assembled from pieces of several files, spanning
    many chunks, that safetensors loads back exactly, with the file's sha256; a source that ends early fails with
    one line and no hang."""
    import hashlib

    import numpy as np
    from safetensors.torch import load_file

    import mop_ray.checkpoint.safetensors_io as io
    from mop_ray.errors import MopError

    monkeypatch.setattr(io, "WRITE_CHUNK", 4096)  # many chunks, few buffers: the queues wrap around often
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 70)).astype(np.float32), rng.standard_normal((50, 33)).astype(np.float32)
    (tmp_path / "a.bin").write_bytes(b"xx" + a.tobytes())  # data at an offset, as in a safetensors shard
    (tmp_path / "b.bin").write_bytes(b.tobytes())
    half = a.nbytes // 2
    tensors = [io.OutTensor("w.a", "F32", (300, 70), [(tmp_path / "a.bin", 2, half), (tmp_path / "a.bin", 2 + half, a.nbytes - half)]),
               io.OutTensor("w.b", "F32", (50, 33), [(tmp_path / "b.bin", 0, b.nbytes)])]
    digest = io.write_shard(tmp_path / "out.safetensors", tensors)
    assert digest == hashlib.sha256((tmp_path / "out.safetensors").read_bytes()).hexdigest()
    got = load_file(tmp_path / "out.safetensors")
    assert np.array_equal(got["w.a"].numpy(), a) and np.array_equal(got["w.b"].numpy(), b)

    short = [io.OutTensor("w.a", "F32", (300, 70), [(tmp_path / "b.bin", 0, a.nbytes)])]  # b.bin is too small
    with pytest.raises(MopError, match="ended early"):
        io.write_shard(tmp_path / "bad.safetensors", short)


def test_the_shard_writer_task_module_imports_no_torch():
    """A Ray worker imports the module a task is defined in: the writer's must stay light (torch alone costs
    seconds per fresh writer process on a GPU node)."""
    code = "import sys, actors.shard_writer; print(sorted(m for m in ('torch', 'pyarrow', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

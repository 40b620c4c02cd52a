"""benchmarks/make_synthetic.py: miniatures with the real structure open in mop-ray and transformers.

The same code writes the full-size Mixtral-8x7B / DeepSeek-V3 shapes for the GPU benchmark; here ``scale="tiny"``
keeps every structural feature (GQA; MLA with q_lora, routing groups, shared expert, a dense first layer, FP8
block scales with partial blocks) at widths a CPU handles in seconds.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mop_ray.checkpoint.reader import Checkpoint

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "benchmarks" / "make_synthetic.py")
ms = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_synthetic", ms)  # dataclasses look their module up while the file executes
_spec.loader.exec_module(ms)

# (kwargs of make_synthetic, family, routed experts, MoE layers)
CASES = {
    "mixtral": (dict(preset="mixtral-8x7b", layers=2, vocab=4096, shard_size="1MB"), "mixtral", 8, [0, 1]),
    "deepseek": (dict(preset="deepseek-v3", layers=3, dense_layers=1, shard_size="4MB"), "deepseek_v3", 16, [1, 2]),
    "deepseek_fp8": (dict(preset="deepseek-v3", layers=3, dense_layers=1, dtype="fp8"), "deepseek_v3", 16, [1, 2]),
}
STRUCTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "num_experts_per_tok", "intermediate_size", "num_local_experts", "moe_intermediate_size",
             "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group", "q_lora_rank",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for name, (kw, *_rest) in CASES.items():
        kw = dict(kw)
        summary = ms.make_synthetic(root / name, kw.pop("preset"), scale="tiny", log=quiet, **kw)
        out[name] = Path(summary["out"])
    return out


def calibration_text() -> str:
    from mop_ray.data.calib import embedded_path

    with gzip.open(embedded_path("code"), "rt") as f:
        docs = [json.loads(next(f))["text"] for _ in range(3)]
    return "\n".join(docs)[:2000] + " The quick brown fox. 12 + 30 = 42. Ünïcødé ✓"


@pytest.mark.parametrize("case", list(CASES))
def test_opens_with_the_mop_ray_reader(written, case):
    _, family, experts, moe_layers = CASES[case]
    d = written[case]
    ckpt = Checkpoint(d)
    assert ckpt.family.name == family
    assert ckpt.num_experts == experts
    assert ckpt.moe_layers == moe_layers
    assert ckpt.mtp_layers == []
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == ckpt.total_bytes
    assert set(index["weight_map"]) == set(ckpt.tensors)
    if case == "mixtral":
        assert len(set(index["weight_map"].values())) > 3  # --shard-size splits it like a release
    else:
        cfg = ckpt.config
        assert (cfg["n_group"], cfg["topk_group"], cfg["n_shared_experts"], cfg["first_k_dense_replace"]) == (4, 2, 1, 1)
        assert cfg["num_nextn_predict_layers"] == 0
        assert ckpt.family.group_constraints(cfg) == (4, 2)


@pytest.mark.parametrize("case", ["mixtral", "deepseek"])
def test_names_and_shapes_are_those_save_pretrained_writes(written, case, tmp_path):
    """Same names and shapes as mop_ray.zoo.tiny's model (transformers save_pretrained) of the same structure;
    the FP8 variant has the same weights plus one ``weight_scale_inv`` per FP8 weight."""
    from transformers.utils import logging

    from mop_ray.zoo.tiny import build_tiny

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    _, family, *_ = CASES[case]
    ours = Checkpoint(written[case])
    overrides = {k: ours.config[k] for k in STRUCTURE if k in ours.config}
    if family == "deepseek_v3":
        overrides["head_dim"] = ours.config["qk_rope_head_dim"]
    ref = Checkpoint(build_tiny(family, tmp_path / "ref", mtp_layers=0, max_shard_size="10MB", **overrides))
    mine = {n: t.shape for n, t in ours.tensors.items() if not n.endswith("weight_scale_inv")}
    theirs = {n: t.shape for n, t in ref.tensors.items()}
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))[:10]
    assert mine == theirs
    if case == "deepseek":
        fp8 = Checkpoint(written["deepseek_fp8"]).tensors
        assert {n: t.shape for n, t in fp8.items() if not n.endswith("weight_scale_inv")} == mine
        assert {n[: -len("_scale_inv")] for n in fp8 if n.endswith("weight_scale_inv")} <= set(mine)


@pytest.mark.parametrize("case", ["mixtral", "deepseek"])
def test_loads_in_transformers_and_runs_a_forward_pass(written, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    d = written[case]
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(calibration_text(), return_tensors="pt").input_ids[:, :256]
    assert int(ids.max()) < vocab and ids.shape[1] > 50  # the benchmark's calibration ids index the embedding
    assert tok.eos_token_id == json.loads((d / "config.json").read_text())["eos_token_id"]
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    # the per-expert tensors on disk are what the fused in-memory experts hold (no random re-init)
    layer = 1
    moe = "block_sparse_moe" if case == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if case == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    ckpt = Checkpoint(d)
    with safe_open(ckpt.tensors[f"model.layers.{layer}.{moe}.experts.3.{gate}.weight"].path, "pt") as f:
        g = f.get_tensor(f"model.layers.{layer}.{moe}.experts.3.{gate}.weight")
    with safe_open(ckpt.tensors[f"model.layers.{layer}.{moe}.experts.3.{up}.weight"].path, "pt") as f:
        u = f.get_tensor(f"model.layers.{layer}.{moe}.experts.3.{up}.weight")
    fused = model.model.layers[layer].mlp.experts.gate_up_proj[3]
    assert torch.equal(fused, torch.cat([g, u])), "loaded experts differ from the written bytes"
    assert 0.015 < float(g.float().std()) < 0.025
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], vocab)
    assert bool(torch.isfinite(logits).all())
    assert float(logits.float().std()) > 0


def test_fp8_weights_have_block_scales_like_the_release(written):
    d = written["deepseek_fp8"]
    ckpt = Checkpoint(d)
    assert ckpt.config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                  "weight_block_size": [128, 128]}
    fp8 = {n: t for n, t in ckpt.tensors.items() if t.dtype == "F8_E4M3"}
    layers_2d = [n for n, t in ckpt.tensors.items() if n.startswith("model.layers.") and len(t.shape) == 2
                 and not n.endswith("_scale_inv") and not n.endswith(".gate.weight")]
    assert sorted(fp8) == sorted(layers_2d)  # attention, dense MLP, shared and routed experts; not the router
    assert any(".self_attn.kv_b_proj." in n for n in fp8) and any(".shared_experts." in n for n in fp8)
    assert any(".layers.0.mlp.gate_proj." in n for n in fp8)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert ckpt.tensors[name].dtype == "BF16"
    assert ckpt.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    partial = 0
    for name, t in fp8.items():
        s = ckpt.tensors[name[: -len("weight")] + "weight_scale_inv"]
        assert s.dtype == "F32"
        assert s.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)), name
        partial += t.shape[0] % 128 != 0 or t.shape[1] % 128 != 0
    assert partial > 0 and len(fp8) == sum(n.endswith("weight_scale_inv") for n in ckpt.tensors)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"  # [256, 192]: 2 x 2 blocks, the last one partial
    with safe_open(ckpt.tensors[name].path, "pt") as f:
        w, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and tuple(s.shape) == (2, 2)
    deq = w.float() * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    assert 0.015 < float(deq.std()) < 0.025 and bool(torch.isfinite(deq).all())


def test_refuses_up_front_when_the_disk_is_too_small(tmp_path, capsys):
    out = tmp_path / "huge"
    rc = ms.main(["--preset", "deepseek-v3", "--layers", "61", "--vocab", str(10**9), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "needs" in err and "GB are free" in err, err
    assert not out.exists()


def test_bad_layer_counts_are_refused(tmp_path):
    with pytest.raises(ms.SynthError, match="at least one MoE layer"):
        ms.make_synthetic(tmp_path / "a", "deepseek-v3", scale="tiny", layers=2, dense_layers=2, log=quiet)
    with pytest.raises(ms.SynthError, match="only for deepseek-v3"):
        ms.make_synthetic(tmp_path / "b", "mixtral-8x7b", scale="tiny", layers=2, dense_layers=1, log=quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


PROBE = """
import json, re, sys
sys.path.insert(0, sys.argv[2])
import torch, make_synthetic
def kb(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
base = kb("VmRSS")  # after torch and the benchmark's imports
s = make_synthetic.make_synthetic(sys.argv[1], "mixtral-8x7b", layers=3, vocab=4096, shard_size="30MB", fsync=False,
                                  overrides={"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                                             "num_key_value_heads": 2}, log=lambda *a: None)
print(json.dumps({"growth": (kb("VmHWM") - base) * 1024, "bytes": s["bytes_written"], "shards": s["shards"]}))
"""


def test_never_holds_the_whole_model_in_memory(tmp_path):
    """~125 MB written: the peak RSS grows by a few tensors (<= 4 MB each), not by the model."""
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "m"), str(REPO / "benchmarks")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["bytes"] > 120e6 and r["shards"] >= 4
    assert r["growth"] < r["bytes"] / 3, r

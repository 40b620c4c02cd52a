"""FP8 block-quantised checkpoints (the official DeepSeek-V3 release format): dequantized for calibration,
kept experts copied verbatim."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError
from mop_ray.prune import prune

from conftest import small_job


def fp8_copy(src, dst, block=(128, 128), everything=False):
    """``src`` (the tiny DeepSeek-V3) with routed-expert weights in float8_e4m3fn plus a weight_scale_inv per
    ``block`` (the last row and column blocks partial where the widths do not divide); ``everything``: every 2-D
    decoder weight but the router's, as in the official release (attention, shared experts, dense MLPs)."""
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        out = {}
        for name, t in tensors.items():
            quantize = ".experts." in name or (everything and name.startswith("model.layers.") and t.dim() == 2
                                               and not name.endswith("mlp.gate.weight"))
            if quantize and name.endswith(".weight"):
                rows, cols = -(-t.shape[0] // block[0]), -(-t.shape[1] // block[1])
                scale = torch.empty(rows, cols)
                for i in range(rows):
                    for j in range(cols):  # e4m3's largest finite value is 448
                        scale[i, j] = t[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max() / 448.0
                full = scale.repeat_interleave(block[0], 0)[:t.shape[0]].repeat_interleave(block[1], 1)[:, :t.shape[1]]
                out[name] = (t.float() / full).to(torch.float8_e4m3fn)
                out[name[: -len("weight")] + "weight_scale_inv"] = scale
            else:
                out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
        new_map.update({n: shard for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.fixture
def fp8_model(tiny_models, tmp_path):
    """The tiny DeepSeek-V3 with block-FP8 routed experts (one 128x128 block per weight at this size)."""
    return fp8_copy(tiny_models["deepseek_v3"], tmp_path / "fp8")


def test_fp8_experts_and_scales_are_copied_verbatim(fp8_model, tmp_path):
    keep = {"1": [0, 3, 4, 7], "2": [1, 2, 5, 6]}
    (tmp_path / "k.json").write_text(json.dumps(keep))
    res = prune(fp8_model, tmp_path / "out", keep_map_file=tmp_path / "k.json")
    src, out = Checkpoint(fp8_model), Checkpoint(res.out)
    assert out.config["quantization_config"] == src.config["quantization_config"]

    def raw(ckpt, name):
        info = ckpt.tensors[name]
        with open(info.path, "rb") as f:
            f.seek(info.start)
            return info.dtype, info.shape, f.read(info.nbytes)

    for layer, ids in keep.items():
        for new, old in enumerate(ids):
            for suffix in ("gate_proj.weight", "gate_proj.weight_scale_inv", "down_proj.weight", "down_proj.weight_scale_inv"):
                a = raw(src, f"model.layers.{layer}.mlp.experts.{old}.{suffix}")
                b = raw(out, f"model.layers.{layer}.mlp.experts.{new}.{suffix}")
                assert a == b
    assert raw(out, "model.layers.1.mlp.experts.0.up_proj.weight")[0] == "F8_E4M3"
    with safe_open(res.out / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.float8_e4m3fn


def test_dequantize_fp8_applies_each_block_scale():
    from mop_ray.arch.layer import dequantize_fp8

    w = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) + 0.1  # blocks of 2 rows x 3 cols
    expected = torch.empty(5, 7)
    for i in range(5):
        for j in range(7):
            expected[i, j] = w[i, j].float() * scale[i // 2, j // 3]
    assert torch.equal(dequantize_fp8(w, scale, (2, 3), torch.float32), expected)
    with pytest.raises(MopError, match=r"needs a \[3, 3\] weight_scale_inv, found \[2, 3\]"):
        dequantize_fp8(w, scale[:2], (2, 3), torch.float32)


def test_fp8_layers_are_dequantized_for_calibration(fp8_model, tiny_models):
    from mop_ray.arch.layer import build_layer

    fp8, ref = Checkpoint(fp8_model), Checkpoint(tiny_models["deepseek_v3"])
    moe = build_layer(fp8, 1).mlp
    original = build_layer(ref, 1).mlp
    assert moe.experts.gate_up_proj.dtype == torch.float32  # the layer's own dtype (its norms, router)
    with safe_open(fp8.tensors["model.layers.1.mlp.experts.3.down_proj.weight"].path, "pt") as f:
        q = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv")
    assert torch.equal(moe.experts.down_proj[3], q.float() * s)
    rel = (moe.experts.gate_up_proj - original.experts.gate_up_proj).norm() / original.experts.gate_up_proj.norm()
    assert 0 < rel < 0.05  # e4m3 keeps ~3 mantissa bits


def test_fp8_weights_dequantized_where_they_compute_equal_dequantizing_each_on_the_host(tiny_models, tmp_path):
    """A stage moves block-FP8 weights as float8 and dequantizes them on its device (``PACKED_FP8``: routed experts
    fused, attention, shared experts, the dense MLP): bit for bit the host's dequantization of each tensor, with
    several blocks per weight, partial ones included; the router stays as it is."""
    from mop_ray.arch.layer import PACKED_FP8, build_layer, layer_state_dict

    ckpt = Checkpoint(fp8_copy(tiny_models["deepseek_v3"], tmp_path / "fp8", block=(8, 12), everything=True))
    for layer in range(ckpt.num_layers):  # a dense layer and MoE layers
        host = layer_state_dict(ckpt, layer)  # per tensor: read, dequantize_fp8 on the host (experts stacked)
        packed = layer_state_dict(ckpt, layer, packed_fp8=True)
        fp8 = packed[PACKED_FP8]
        assert "self_attn.o_proj.weight" in fp8 and "self_attn.o_proj.weight" not in packed
        if layer in ckpt.moe_layers:
            w, scale_inv, rows, cols, dtype, shape = fp8["mlp.experts.down_proj"]
            assert w.dtype == torch.float8_e4m3fn and scale_inv.shape[1:] == (-(-w.shape[1] // 8), -(-w.shape[2] // 12))
            assert "mlp.shared_experts.up_proj.weight" in fp8 and "mlp.gate.weight" in packed  # the router stays
        built = build_layer(ckpt, layer).state_dict()  # the packed path
        assert set(built) == set(host)
        for name, want in host.items():
            assert built[name].dtype == want.dtype and torch.equal(built[name], want), name


def test_pruning_an_fp8_model_with_calibration_keeps_fp8_experts(fp8_model, tmp_path, ray_local):
    from actors.coordinator import run

    res = run(small_job(fp8_model, tmp_path / "o", stages=1, method="reap"), log=lambda *_: None)
    out = Checkpoint(res["out"])
    assert out.num_experts == 4 and out.config["quantization_config"]["quant_method"] == "fp8"
    src = Checkpoint(fp8_model)
    for layer, ids in res["keep_map"].items():
        for new, old in enumerate(ids):
            a = f"model.layers.{layer}.mlp.experts.{old}.up_proj.weight_scale_inv"
            b = f"model.layers.{layer}.mlp.experts.{new}.up_proj.weight_scale_inv"
            with safe_open(src.tensors[a].path, "pt") as fa, safe_open(out.tensors[b].path, "pt") as fb:
                assert torch.equal(fa.get_tensor(a), fb.get_tensor(b))


def test_plan_counts_fp8_weights_at_their_dequantized_size(fp8_model, tiny_models):
    from mop_ray.plan import plan_stages

    fp8, ref = Checkpoint(fp8_model), Checkpoint(tiny_models["deepseek_v3"])  # ref: the same model in fp32
    expert_elems = sum(t.nbytes // 4 for n, t in ref.layer_tensors(1).items() if ".experts." in n)
    assert fp8.layer_bytes[1] < fp8.resident_layer_bytes[1] == ref.layer_bytes[1] - 2 * expert_elems  # 4 -> 2 bytes
    decoder = sum(fp8.resident_layer_bytes[i] for i in range(fp8.num_layers))  # not the MTP layer
    stages = plan_stages(fp8, 2)
    assert sum(s.weight_bytes for s in stages) == decoder + fp8.tensors["model.embed_tokens.weight"].nbytes
    # the float8 copy of a stage's largest FP8 layer while that layer is dequantized on the device (less its scales)
    fp8_bytes = {i: sum(t.nbytes if t.dtype == "F8_E4M3" else -t.nbytes for n, t in fp8.layer_tensors(i).items()
                        if t.dtype == "F8_E4M3" or n.endswith("weight_scale_inv")) for i in fp8.moe_layers}
    assert min(fp8_bytes.values()) > 0
    for st in stages:
        assert st.transient_bytes == max(fp8_bytes.get(i, 0) for i in st.layers)
        assert st.memory_bytes == st.weight_bytes + st.activation_bytes + st.transient_bytes

"""FP8 block-quantised checkpoints (the official DeepSeek-V3 release format): kept experts copied verbatim."""

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


@pytest.fixture
def fp8_model(tiny_models, tmp_path):
    """The tiny DeepSeek-V3 with routed-expert weights in float8_e4m3fn plus 128x128-block weight_scale_inv."""
    src = tiny_models["deepseek_v3"]
    dst = tmp_path / "fp8"
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        out = {}
        for name, t in tensors.items():
            if ".experts." in name and name.endswith(".weight"):
                out[name] = t.to(torch.float8_e4m3fn)
                out[name[: -len("weight")] + "weight_scale_inv"] = torch.rand(1, 1) + 0.5  # one 128x128 block
            else:
                out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
        new_map.update({n: shard for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


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


def test_calibrating_fp8_layers_fails_clearly(fp8_model, tmp_path, ray_local):
    from actors.coordinator import run

    with pytest.raises(MopError, match="FP8 block-quantised"):
        run(small_job(fp8_model, tmp_path / "o", stages=1), log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_incomplete_expert_sets_are_refused(tiny_models, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_models["olmoe"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.5.up_proj.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MopError, match="layer 1 expert 5 has tensors"):
        Checkpoint(src)

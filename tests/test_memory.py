"""Peak memory of the pruned writer: streaming byte ranges keeps RSS far below one layer, whatever the model size."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from mop_ray.zoo.tiny import COMMON

H, I, E, LAYERS = 512, 1280, 8, 12  # one layer ~34 MB in bf16; the model ~410 MB

# VmHWM is this process's own peak RSS; ru_maxrss would inherit the parent's peak across fork+exec.
PROBE = """
import json, re, sys
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.prune import prune  # imports are part of the baseline
ckpt = Checkpoint(sys.argv[1])
if sys.argv[2] == "prune":
    prune(sys.argv[1], sys.argv[3], keep=4, max_shard_size="100MB")
print(json.dumps({"hwm_kb": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))}))
"""


def build_big_mixtral(path):
    """A Mixtral-layout checkpoint written layer by layer (values do not matter for the writer)."""
    path.mkdir()
    cfg = {**COMMON, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": H,
           "intermediate_size": I, "num_local_experts": E, "num_hidden_layers": LAYERS, "num_attention_heads": 8,
           "num_key_value_heads": 8, "vocab_size": 1024}
    (path / "config.json").write_text(json.dumps(cfg))
    weight_map, total = {}, 0
    for i in range(LAYERS + 1):
        p, tensors = f"model.layers.{i}.", {}
        if i == LAYERS:
            tensors = {"model.embed_tokens.weight": torch.zeros(1024, H, dtype=torch.bfloat16),
                       "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
                       "lm_head.weight": torch.zeros(1024, H, dtype=torch.bfloat16)}
        else:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{proj}.weight"] = torch.zeros(H, H, dtype=torch.bfloat16)
            tensors[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
            tensors[p + "block_sparse_moe.gate.weight"] = torch.zeros(E, H, dtype=torch.bfloat16)
            for e in range(E):
                for w, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                    tensors[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = torch.full(shape, e, dtype=torch.bfloat16)
        shard = f"model-{i + 1:05d}-of-{LAYERS + 1:05d}.safetensors"
        save_file(tensors, path / shard, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def peak_kb(*args) -> int:
    res = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["hwm_kb"]


def test_peak_rss_of_pruning_stays_below_one_layer(tmp_path):
    src = tmp_path / "big"
    build_big_mixtral(src)
    from mop_ray.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(src)
    largest = max(ckpt.layer_bytes.values())
    assert ckpt.total_bytes >= 10 * largest

    baseline = peak_kb(src, "open")
    pruning = peak_kb(src, "prune", tmp_path / "out")
    growth = (pruning - baseline) * 1024
    assert growth < 2 * largest, f"pruning grew RSS by {growth / 1e6:.1f} MB; largest layer {largest / 1e6:.1f} MB"
    out = Checkpoint(tmp_path / "out")
    assert out.num_experts == 4 and out.total_bytes < ckpt.total_bytes * 0.6
    print(f"largest layer {largest / 1e6:.1f} MB, model {ckpt.total_bytes / 1e6:.0f} MB, "
          f"baseline RSS {baseline / 1024:.0f} MB, pruning RSS {pruning / 1024:.0f} MB")

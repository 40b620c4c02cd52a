"""``mop_ray.load_pruned``: load any checkpoint mop-ray wrote, including non-uniform ones (C-Prune global).

A uniform checkpoint is a stock one and loads with ``AutoModelForCausalLM.from_pretrained`` (this function
just calls it). A non-uniform checkpoint — different expert counts per layer, which no stock config can
describe — is marked so stock loaders refuse it (``mop_ray.checkpoint.nonuniform``); here the model is
built on ``meta`` from the original config, every MoE decoder layer is rebuilt with its own count, and all
tensors are assigned from the safetensors shards (per-expert tensors stacked into transformers' fused layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mop_ray.errors import MopError


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **kwargs):
    """The causal LM in ``path`` (eval mode). ``kwargs`` go to ``from_pretrained`` for uniform checkpoints."""
    from transformers import AutoModelForCausalLM

    from mop_ray.checkpoint.nonuniform import MARKER
    from mop_ray.checkpoint.reader import Checkpoint, load_json

    if MARKER not in load_json(Path(path) / "config.json", "the model config"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    ckpt = Checkpoint(path)
    if kwargs:
        raise MopError(f"load_pruned: options {sorted(kwargs)} are only supported for uniform checkpoints")
    return _load_nonuniform(ckpt, dtype, device)


def _load_nonuniform(ckpt, dtype, device):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig

    from mop_ray.arch.layer import hf_config, layer_state_dict

    fam = ckpt.family
    config = hf_config(ckpt)  # the largest per-layer count; each MoE layer is rebuilt below with its own
    config.mop_ray_nonuniform = {"experts_per_layer": {str(k): v for k, v in sorted(ckpt.experts_per_layer.items())}}
    layer_cls = getattr(fam.modeling(), fam.decoder_layer_class)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        for i, n in sorted(ckpt.experts_per_layer.items()):
            model.model.layers[i] = layer_cls(hf_config(ckpt, experts=n), layer_idx=i)
    state: dict[str, torch.Tensor] = {}
    for i in range(ckpt.num_layers):
        state.update({f"model.layers.{i}.{k}": v for k, v in layer_state_dict(ckpt, i).items()})
    for name, info in ckpt.tensors.items():
        if ckpt.layer_of(name) is None:
            with safe_open(info.path, "pt") as f:
                state[name] = f.get_tensor(name)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise MopError(f"{ckpt.path}: tensors do not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    model.model.rotary_emb = getattr(fam.modeling(), fam.rotary_class)(config)  # non-persistent buffers
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise MopError(f"{ckpt.path}: no tensors for {left[:3]}")
    if (ckpt.path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(ckpt.path)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()

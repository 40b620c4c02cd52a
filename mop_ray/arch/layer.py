"""Build one decoder layer on ``meta`` and load exactly its tensors from safetensors (no full-model load).

transformers 5.x keeps routed experts fused in memory (``mlp.experts.gate_up_proj [E, 2I, H]`` =
cat(gate, up) per expert, ``mlp.experts.down_proj [E, H, I]``) while checkpoints store them per expert
(``experts.{e}.gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2`` under ``block_sparse_moe``);
this module does the stacking the library's own loader does.
"""

from __future__ import annotations

import re
from contextlib import ExitStack

import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError


def hf_config(ckpt: Checkpoint, attn_implementation: str = "sdpa", experts_implementation: str = "grouped_mm",
              experts: int | None = None):
    """The transformers config with attention and experts kernels set explicitly, as ``from_pretrained`` does.

    Left unset, a standalone layer silently ran non-causal attention and a different experts kernel.
    ``experts`` overrides the routed-expert count (one layer of a non-uniform checkpoint).
    """
    from transformers import AutoConfig

    if ckpt.experts_per_layer is None and experts is None:
        cfg = AutoConfig.from_pretrained(ckpt.path)
    else:  # a non-uniform checkpoint's config.json is deliberately unknown to AutoConfig: build from the dict
        cfg = ckpt.family.config_class().from_dict(ckpt.family.patch_config(ckpt.config, experts or ckpt.num_experts))
    cfg._attn_implementation = attn_implementation
    cfg._experts_implementation = experts_implementation
    return cfg


def layer_state_dict(ckpt: Checkpoint, i: int) -> dict[str, torch.Tensor]:
    """Module-named tensors of decoder layer i, experts stacked into the fused layout."""
    from safetensors import safe_open

    fam = ckpt.family
    prefix = fam.layer_prefix(i)
    names = sorted(ckpt.layer_tensors(i))
    if not names:
        raise MopError(f"{ckpt.path}: no tensors for layer {i} (expected names starting with {prefix!r})")
    if any(n.endswith("weight_scale_inv") for n in names):
        raise MopError(f"{ckpt.path}: layer {i} is FP8 block-quantised; calibration on FP8 layers is not supported yet")
    gate_n, up_n, down_n = fam.expert_projs
    per_expert = re.compile(rf"^{re.escape(fam.moe_module)}\.experts\.(\d+)\.({gate_n}|{up_n}|{down_n})\.weight$")
    sd: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    with ExitStack() as stack:
        handles = {}
        for name in names:
            info = ckpt.tensors[name]
            f = handles.get(info.path) or handles.setdefault(info.path, stack.enter_context(safe_open(info.path, "pt")))
            tensor = f.get_tensor(name)
            local = name[len(prefix):]
            if m := per_expert.match(local):
                experts.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
                continue
            if local.startswith(fam.moe_module + "."):
                local = "mlp." + local[len(fam.moe_module) + 1:]
            sd[local] = tensor
    if experts:
        n = ckpt.experts_in(i)
        if sorted(experts) != list(range(n)) or any(len(v) != 3 for v in experts.values()):
            raise MopError(f"{ckpt.path}: layer {i} has an incomplete expert set (expected {n} experts x 3 projections)")
        sd["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([experts[e][gate_n], experts[e][up_n]]) for e in range(n)])  # [E, 2I, H]
        sd["mlp.experts.down_proj"] = torch.stack([experts[e][down_n] for e in range(n)])  # [E, H, I]
    return sd


def build_layer(ckpt: Checkpoint, i: int, *, config=None, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Decoder layer i of ``ckpt``, built on meta and filled with its own tensors only (eval mode)."""
    config = config or hf_config(ckpt)
    cls = getattr(ckpt.family.modeling(), ckpt.family.decoder_layer_class)
    with torch.device("meta"):
        layer = cls(config, layer_idx=i)
    sd = layer_state_dict(ckpt, i)
    try:
        layer.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise MopError(f"{ckpt.path}: layer {i} tensors do not match {ckpt.family.decoder_layer_class}: {first}") from None
    leftover = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if leftover:
        raise MopError(f"{ckpt.path}: layer {i}: no checkpoint tensors for {leftover}")
    layer = layer.to(device=device, dtype=dtype) if dtype is not None else layer.to(device)
    return layer.eval()


def rotary_embedding(ckpt: Checkpoint, config=None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model's weightless rotary module, needed to run any decoder layer standalone."""
    config = config or hf_config(ckpt)
    cls = getattr(ckpt.family.modeling(), ckpt.family.rotary_class)
    return cls(config).to(device)

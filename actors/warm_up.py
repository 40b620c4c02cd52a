"""A stage's first micro-batch call took 1.4–2.1 s on an H200 where the next took 47 ms
(``benchmarks/first_call.py``): the process's first use of each CUDA kernel (loaded lazily), of cuBLAS and cuDNN,
of the caching allocators for device and pinned memory, and of the sample writer — paid while the first wave waited
for it. ``warm_up`` pays it beside the first layer's read instead: one micro-batch of the real shape through a
stand-in decoder layer (the layer's config with the fewest experts its routing allows, random weights) observed as
the stage observes, into a sample that is thrown away.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mop_ray.arch.layer import hf_config, meta_layer
from mop_ray.arch.routing import RouterSpec
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.observe.observer import MoEObserver, token_meta
from mop_ray.observe.records import SampleWriter

TMP_PREFIX = "mop-ray-warm-up-"  # the throwaway sample's directory, removed after the warm-up
SAMPLE_EVERY = 4  # the warm-up samples every 4th token: pinned buffers of a sample's size (--sample 1/4 of tokens)


def standin_experts(spec: RouterSpec, n_experts: int) -> int:
    """The fewest routed experts that route as ``spec`` does: ``n_group`` groups, each with enough experts that
    ``topk_group`` groups hold ``top_k`` (and V3's top-2 group score stays defined); at most ``n_experts``."""
    per_group = max(spec.min_per_group, -(-spec.top_k // spec.topk_group))
    return min(n_experts, max(spec.top_k, spec.n_group * per_group))


def standin_layer(ckpt: Checkpoint, layer: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Decoder layer ``layer``'s class and config with ``standin_experts`` experts (an MoE layer), random weights
    on ``device``; nothing is read from the checkpoint."""
    fam = ckpt.family
    moe = layer in ckpt.moe_layers
    experts = standin_experts(fam.router_spec(ckpt.config), ckpt.experts_in(layer)) if moe else None
    module = meta_layer(ckpt, layer, hf_config(ckpt, experts=experts)).to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
    return module


@torch.no_grad()
def warm_up(ckpt: Checkpoint, layer: int, rotary: torch.nn.Module, device: torch.device, dtype: torch.dtype,
            shape: tuple[int, int]) -> dict:
    """Run one micro-batch of ``shape`` (blocks, tokens per block) through a stand-in of decoder layer ``layer``
    on the current stream, observed (an MoE layer) as ``LayerShardWorker`` observes it; -> {"s": seconds taken,
    "experts": the stand-in's routed experts (None: a dense layer), "rows": sampled rows written and discarded}."""
    t0 = time.perf_counter()
    module = standin_layer(ckpt, layer, device, dtype)
    blocks, seq = shape
    h = torch.randn(blocks, seq, int(ckpt.config["hidden_size"]), device=device, dtype=dtype)  # [B, L, H]
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(blocks, -1)  # [B, L]
    meta = token_meta(np.zeros(blocks, dtype=np.int64), np.arange(blocks), seq,
                      np.arange(blocks * seq).reshape(blocks, seq) % SAMPLE_EVERY == 0, device)
    experts = rows = None
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as tmp:
        writer = None
        if layer in ckpt.moe_layers:
            fam, moe = ckpt.family, module.mlp
            writer = SampleWriter(Path(tmp), ["warm-up"])
            experts = moe.gate.weight.shape[0]
            obs = MoEObserver(layer, fam, fam.router_spec(ckpt.config), experts, 1, writer,
                              acts_as=ckpt.experts_in(layer))
            plain = moe.forward
            moe.forward = lambda hs, *a, **kw: obs.block_forward(moe, plain, meta, hs, *a, **kw)
        try:
            module(h, attention_mask=None, position_ids=pos, position_embeddings=rotary(h, pos))
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        finally:
            if writer is not None:
                writer.close()
                rows = writer.rows
    return {"s": time.perf_counter() - t0, "experts": experts, "rows": rows}

"""LayerShard: a Ray actor holding consecutive decoder layers [a, b) on one GPU (or a CPU worker).

It builds its layers on ``meta`` from the arch adapter, loads only their tensors with ``safe_open``, and runs
calibration micro-batches through them. The first stage owns the token embedding and takes token ids;
every stage returns hidden states as a CPU tensor for the next one. A forward hook on each MoE block hands
the block's input and output to an ``MoEObserver`` (statistics over all tokens + the sampled rows).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mop_ray.arch.layer import build_layer, dtype_named, hf_config, layer_state_dict, rotary_embedding
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.observe.observer import MoEObserver
from mop_ray.observe.records import SampleWriter, layer_dir, write_stats


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor (CUDA_VISIBLE_DEVICES is set per actor), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _fault_injection(layers: list[int], mb_id: int | str) -> None:
    """Test hook: MOP_RAY_FAULT_EXIT="<layer>:<micro-batch>:<marker file>" kills the process holding that layer
    once, at that micro-batch (or "select": when it selects for that layer; the marker file makes it once), so
    tests can exercise actor loss for real."""
    spec = os.environ.get("MOP_RAY_FAULT_EXIT")
    if not spec:
        return
    layer, mb, marker = spec.split(":", 2)
    if int(layer) in layers and mb == str(mb_id) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


class LayerShardWorker:
    """The actor body; ``ray.remote(LayerShardWorker)`` is created by the coordinator with its resources."""

    def __init__(self, model_dir: str, layers: list[int], run_dir: str, sources: list[str] | None, *,
                 first_stage: bool, record: bool = True, dtype: str | None = None):
        """Load the layers; with ``sources`` (the calibration's source names) also start recording, else
        ``begin(sources)`` does (the coordinator starts the stages while it tokenises the calibration set)."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        self.load_times: dict[str, float] = {"read_s": 0.0}  # seconds per step of the start (logs, benchmarks/speed.py)
        self.ckpt = ckpt = Checkpoint(model_dir)
        self.layer_ids = list(layers)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        try:  # the first layer's read (and the embedding's) overlap the imports and the device's initialisation
            ahead = reader.submit(self._read, self.layer_ids[0]) if self.layer_ids else None
            embed = reader.submit(self._read_embedding) if first_stage else None
            self.device = pick_device()
            self.config = hf_config(ckpt)
            dt = dtype_named(dtype)
            self.load_times["config_s"] = time.perf_counter() - t0
            self.layers = self._load_layers(dt, reader, ahead)
            t1 = time.perf_counter()
            self.rotary = rotary_embedding(ckpt, self.config, self.device)
            self.embed = None
            if embed is not None:
                weight = embed.result()
                self.embed = torch.nn.Embedding.from_pretrained(weight.to(dt) if dt else weight).to(self.device)
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
        self.load_times["rotary_embed_s"] = time.perf_counter() - t1
        self.load_times["total_s"] = time.perf_counter() - t0
        self.run_dir = run_dir
        self.record = record
        self.sources: list[str] | None = None
        self.observers: dict[int, MoEObserver] = {}
        self._hooks = []
        self._meta: dict | None = None
        if sources is not None:
            self.begin(sources)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        sd = layer_state_dict(self.ckpt, i)
        self.load_times["read_s"] += time.perf_counter() - t  # in the reader thread, overlapping the builds
        return sd

    def _read_embedding(self) -> torch.Tensor:
        from safetensors import safe_open

        name = "model.embed_tokens.weight"
        with safe_open(self.ckpt.tensors[name].path, "pt") as f:
            return f.get_tensor(name)  # [V, H]

    def _load_layers(self, dtype, reader, ahead) -> list[torch.nn.Module]:
        """Build this stage's layers while ``reader`` reads layer j+1 (``ahead``: the first layer's read, already
        submitted). At most one layer is read ahead, so host memory holds at most two layers' tensors (and the
        first stage's embedding) on the way to a GPU."""
        ids, layers, times = self.layer_ids, [], self.load_times
        times["read_wait_s"] = times["build_s"] = 0.0
        for j, i in enumerate(ids):
            t = time.perf_counter()
            sd = ahead.result()
            times["read_wait_s"] += time.perf_counter() - t
            ahead = reader.submit(self._read, ids[j + 1]) if j + 1 < len(ids) else None
            t = time.perf_counter()
            layers.append(build_layer(self.ckpt, i, config=self.config, device=self.device, dtype=dtype, state_dict=sd))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times["build_s"] += time.perf_counter() - t  # build on meta, assign, copy to the device
            del sd
        return layers

    def begin(self, sources: list[str]) -> None:
        """Observe every MoE layer this stage holds (when recording), with statistics per source."""
        self.sources = sources
        if not self.record:
            return
        ckpt = self.ckpt
        spec = ckpt.family.router_spec(ckpt.config)
        for i, layer in zip(self.layer_ids, self.layers):
            if i in ckpt.moe_layers:
                obs = MoEObserver(i, ckpt.family, spec, ckpt.num_experts, len(sources),
                                  SampleWriter(layer_dir(self.run_dir, i), sources))
                self.observers[i] = obs
                self._hooks.append(layer.mlp.register_forward_hook(self._hook(obs)))

    def _hook(self, obs: MoEObserver):
        def hook(module, args, output):
            x = args[0]
            h = x.shape[-1]
            m = self._meta
            obs.observe(module, x.reshape(-1, h), output.reshape(-1, h), m["source"], m["sample"], m["block"], m["pos"])
        return hook

    @torch.no_grad()
    def forward(self, mb_id: int, inp: torch.Tensor, meta: dict, last: bool = False) -> torch.Tensor | None:
        """Run one micro-batch: token ids [B, L] on the first stage, hidden states [B, L, H] after; -> [B, L, H] CPU
        for the next stage, None from the ``last`` stage (nobody needs its hidden states)."""
        _fault_injection(self.layer_ids, mb_id)
        h = self.embed(inp.to(self.device)) if self.embed is not None else inp.to(self.device)
        bsz, seq = h.shape[:2]
        pos = torch.arange(seq, device=self.device).unsqueeze(0).expand(bsz, -1)  # [B, L]
        pe = self.rotary(h, pos)
        source = torch.as_tensor(np.repeat(meta["source"], seq))  # [B*L]
        block = torch.as_tensor(np.repeat(meta["block"], seq))
        self._meta = {"source": source, "block": block, "pos": torch.arange(seq).repeat(bsz),  # host, [B*L]
                      "sample": torch.from_numpy(np.array(meta["sample"], dtype=bool)).reshape(-1)}
        for layer in self.layers:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        self._meta = None
        if last:
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the micro-batch is done (and timed) when the call returns
            return None
        if self.device.type == "cuda":  # through (cached) pinned memory: a direct DMA, no page faults
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
            return host.copy_(h)
        return h.cpu()

    def finish(self) -> dict[int, dict]:
        """Close the sample files and write the statistics; -> {layer: {"rows", "tokens"}}."""
        for handle in self._hooks:  # the blocks may be used for selection next (``select``), unobserved
            handle.remove()
        self._hooks.clear()
        done = {}
        for i, obs in self.observers.items():  # obs.stats: the device's sums, brought to the host once
            rows = obs.sample_writer.rows
            obs.sample_writer.close()
            write_stats(layer_dir(self.run_dir, i), self.sources, obs.tokens, obs.stats)
            done[i] = {"rows": rows, "tokens": int(obs.tokens.sum())}
        return done

    def select(self, contexts: list, method: str, r: int) -> list:
        """``actors.tasks.select_layer`` for MoE layers this stage holds, with the weights it already has in
        memory (no second read of the layer); call after ``finish``. -> one result per context."""
        return [self._select_one(ctx, method, r) for ctx in contexts]

    def _select_one(self, ctx, method: str, r: int):
        from actors.tasks import select_layer

        _fault_injection([ctx.layer], "select")
        block = self.layers[self.layer_ids.index(ctx.layer)].mlp
        out = select_layer(self.run_dir, ctx, method, r, block=block)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the next layer's products start from a clean pool
        return out

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                "gpus": ray.get_gpu_ids(), "layers": self.layer_ids}

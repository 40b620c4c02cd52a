"""Write a real-shape MoE checkpoint with random weights straight to disk, tensor by tensor.

    python benchmarks/make_synthetic.py --preset mixtral-8x7b --layers 2 --out /data/mixtral-2l
    python benchmarks/make_synthetic.py --preset deepseek-v3 --layers 2 --dense-layers 1 --out /data/dsv3-1d1m
    python benchmarks/make_synthetic.py --preset deepseek-v3 --layers 3 --dense-layers 1 --dtype fp8 --out /data/dsv3-fp8
    python benchmarks/make_synthetic.py --preset deepseek-v3 --scale tiny --layers 3 --dtype f32 --out /tmp/dsv3-tiny  # CPU

What is written (a directory every mop-ray reader and ``transformers.AutoModelForCausalLM`` opens):
- ``config.json``: the public config of the preset (Mixtral-8x7B-v0.1, DeepSeek-V3) with ``num_hidden_layers``
  (and ``first_k_dense_replace``) cut to ``--layers`` (``--dense-layers``), ``--vocab``/``--scale``/``--set``
  overrides applied, bos/eos ids set to the written tokenizer's, and for ``--dtype fp8`` the official
  ``quantization_config`` (fp8, e4m3, dynamic activations, 128x128 weight blocks). DeepSeek MTP layers are
  not written (``num_nextn_predict_layers`` 0).
- ``model-000NN-of-000MM.safetensors`` (``format: pt``) of at most ``--shard-size`` each and
  ``model.safetensors.index.json``. Tensor names are the per-expert on-disk names of the real releases (the
  ones ``save_pretrained`` writes; tests/test_synthetic.py compares them with ``mop_ray.zoo.tiny``):
  Mixtral ``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`` and ``block_sparse_moe.gate``;
  DeepSeek-V3 ``model.layers.{i}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``, ``mlp.shared_experts.*``,
  ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias`` (float32), dense ``mlp.gate_proj/up_proj/down_proj``
  in the first ``first_k_dense_replace`` layers, and MLA attention (``q_a_proj``, ``q_a_layernorm``,
  ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``).
- ``--dtype fp8``: every 2-D weight inside the decoder layers except the router (attention, dense MLP, shared
  and routed experts) is float8_e4m3fn with a float32 ``<name>_scale_inv`` of shape
  [ceil(out/128), ceil(in/128)], like the official DeepSeek-V3 release; embeddings, lm_head, norms, the
  router and its correction bias stay bf16/fp32. Dequantised weights (fp8 × scale_inv) have std ~0.02.
- ``--dtype f32``: float32 instead of bf16 everywhere, for CPU test runs only (CPUs without bf16 units run bf16
  matmuls 10-20x slower than float32; no release ships float32).
- a tokenizer: the shipped tiny-mixtral byte-level BPE (4,096 ids) when ``vocab_size >= 4096``, else a
  byte-level BPE trained with ``vocab_size`` ids (``mop_ray.zoo.tiny.build_tokenizer``); either way every id
  the tokenizer can produce is below ``vocab_size``. ``synthetic.json`` records how the directory was made.

Values: bf16 weights ~ N(0, 0.02²) (``initializer_range``), routers ~ N(0, 1/hidden) so router logits of
unit-RMS inputs have std ~1 whatever the width, norms 1, correction bias ~ U(-0.05, 0.05). Each tensor has its
own generator seeded from (``--seed``, its name), so values do not depend on ``--shard-size``; CUDA and CPU
generators give different values for the same seed.

Memory: nothing beyond ~3 tensors is alive at a time (one being generated, up to two queued for a writer
thread), so the 28 GB DeepSeek-V3 checkpoint with one dense and one MoE layer needs a few GB of RAM at most
(its largest tensors are the 1.85 GB embedding and lm_head). Generation runs on the GPU when there is one (``--device``), else on the CPU cores.
Each shard's header is computed up front (mop-ray's own safetensors layout: ``safetensors_io.header_layout``), then
the tensors' bytes are appended in header order and the file is fsync'ed (``--no-fsync`` to skip), so the
printed GB/s is disk throughput, not page-cache throughput. The planned bytes are checked against the free
space before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from mop_ray.checkpoint.safetensors_io import DTYPE_SIZES, OutTensor, header_layout  # noqa: E402
from mop_ray.checkpoint.writer import parse_size, plan_shards  # noqa: E402  (plan_shards: any items with .nbytes)

# Public config.json files (Mixtral-8x7B-v0.1, DeepSeek-V3), minus remote-code keys (auto_map) and version stamps.
PRESETS: dict[str, dict] = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    },
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    },
}
# Miniatures with the same structure (GQA; MLA with q_lora, groups, shared expert, dense first layers); the
# DeepSeek widths are not multiples of 128 on purpose, so fp8 scales have partial blocks as in kv_a_proj.
TINY: dict[str, dict] = {
    "mixtral-8x7b": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096},
    "deepseek-v3": {"hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 192,
                    "n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96, "kv_lora_rank": 64,
                    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 512,
                    "first_k_dense_replace": 1},
}
DEFAULT_LAYERS = {"mixtral-8x7b": 2, "deepseek-v3": 2}
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_BLOCK = 128
FP8_STD = 64.0  # fp8 values ~ N(0, 64²) clipped to ±448 (e4m3 max); scale_inv = 0.02 / 64 → dequantised std 0.02
SHIPPED_TOKENIZER = REPO / "mop_ray" / "zoo" / "models" / "tiny-mixtral"
SHIPPED_VOCAB = 4096  # ids 0..4095; <|endoftext|> = 0 is bos, eos and pad
MIN_VOCAB = 258  # a byte-level BPE needs its 256-byte alphabet and two special tokens


class SynthError(Exception):
    """A refused request; main() prints it as one line and exits 2."""


@dataclass(frozen=True)
class Spec:
    """One tensor to generate: its on-disk name, safetensors dtype, shape and how to fill it."""

    name: str
    dtype: str  # "BF16" | "F32" | "F8_E4M3"
    shape: tuple[int, ...]
    kind: str  # "normal" | "router" | "ones" | "bias" | "fp8" | "scale"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


# --- the tensor plan ---------------------------------------------------------------------------------------

def build_config(preset: str, *, layers: int | None = None, dense_layers: int | None = None, scale: str | None = None,
                 vocab: int | None = None, overrides: dict | None = None, fp8: bool = False) -> dict:
    if preset not in PRESETS:
        raise SynthError(f"--preset {preset!r}: unknown; available: {', '.join(PRESETS)}")
    cfg = json.loads(json.dumps(PRESETS[preset]))
    if scale == "tiny":
        cfg.update(TINY[preset])
    elif scale not in (None, "full"):
        raise SynthError(f"--scale {scale!r}: expected 'full' or 'tiny'")
    cfg.update(overrides or {})
    if vocab is not None:
        cfg["vocab_size"] = int(vocab)
    n = int(layers if layers is not None else DEFAULT_LAYERS[preset])
    if n < 1:
        raise SynthError(f"--layers {n}: expected at least 1")
    cfg["num_hidden_layers"] = n
    if cfg["model_type"] == "deepseek_v3":
        dense = int(dense_layers) if dense_layers is not None else min(int(cfg["first_k_dense_replace"]), n - 1)
        if not 0 <= dense < n:
            raise SynthError(f"--dense-layers {dense}: expected 0..{n - 1} so that at least one MoE layer remains")
        cfg["first_k_dense_replace"] = dense
        cfg["num_nextn_predict_layers"] = 0  # MTP layers are not written
        e, g = int(cfg["n_routed_experts"]), int(cfg["n_group"])
        if e % g or e // g < 2:
            raise SynthError(f"n_routed_experts {e} / n_group {g}: need equal groups of at least 2 experts")
    elif dense_layers is not None:
        raise SynthError(f"--dense-layers: only for deepseek-v3 (every {preset} layer is MoE)")
    if int(cfg["vocab_size"]) < MIN_VOCAB:
        raise SynthError(f"--vocab {cfg['vocab_size']}: expected at least {MIN_VOCAB} (byte-level tokenizer)")
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANT)
    return cfg


def _linear(name: str, out_dim: int, in_dim: int, fp8: bool, wd: str) -> list[Spec]:
    if not fp8:
        return [Spec(name, wd, (out_dim, in_dim), "normal")]
    scales = (math.ceil(out_dim / FP8_BLOCK), math.ceil(in_dim / FP8_BLOCK))
    return [Spec(name, "F8_E4M3", (out_dim, in_dim), "fp8"), Spec(name + "_scale_inv", "F32", scales, "scale")]


def _mlp(prefix: str, names: tuple[str, str, str], hidden: int, inter: int, fp8: bool, wd: str) -> list[Spec]:
    gate, up, down = names
    return (_linear(f"{prefix}.{gate}.weight", inter, hidden, fp8, wd)
            + _linear(f"{prefix}.{up}.weight", inter, hidden, fp8, wd)
            + _linear(f"{prefix}.{down}.weight", hidden, inter, fp8, wd))


def layer_specs(cfg: dict, i: int, fp8: bool = False, wd: str = "BF16") -> list[Spec]:
    """The tensors of decoder layer i, with the names the public checkpoints (and save_pretrained) use.

    ``wd``: safetensors dtype of the unquantised tensors ("BF16", or "F32" for CPU test runs)."""
    h = int(cfg["hidden_size"])
    p = f"model.layers.{i}."
    out = [Spec(p + "input_layernorm.weight", wd, (h,), "ones"),
           Spec(p + "post_attention_layernorm.weight", wd, (h,), "ones")]
    if cfg["model_type"] == "mixtral":
        nh, nkv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
        d = int(cfg.get("head_dim") or h // nh)
        a = p + "self_attn."
        out += _linear(a + "q_proj.weight", nh * d, h, fp8, wd) + _linear(a + "k_proj.weight", nkv * d, h, fp8, wd)
        out += _linear(a + "v_proj.weight", nkv * d, h, fp8, wd) + _linear(a + "o_proj.weight", h, nh * d, fp8, wd)
        m = p + "block_sparse_moe."
        e = int(cfg["num_local_experts"])
        out.append(Spec(m + "gate.weight", wd, (e, h), "router"))
        for j in range(e):  # w1 = gate, w3 = up, w2 = down
            out += _mlp(f"{m}experts.{j}", ("w1", "w3", "w2"), h, int(cfg["intermediate_size"]), fp8, wd)
        return out
    # deepseek_v3: MLA attention
    nh = int(cfg["num_attention_heads"])
    nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
    kv_lora = int(cfg["kv_lora_rank"])
    a = p + "self_attn."
    if cfg.get("q_lora_rank"):
        q_lora = int(cfg["q_lora_rank"])
        out += _linear(a + "q_a_proj.weight", q_lora, h, fp8, wd)
        out.append(Spec(a + "q_a_layernorm.weight", wd, (q_lora,), "ones"))
        out += _linear(a + "q_b_proj.weight", nh * (nope + rope), q_lora, fp8, wd)
    else:
        out += _linear(a + "q_proj.weight", nh * (nope + rope), h, fp8, wd)
    out += _linear(a + "kv_a_proj_with_mqa.weight", kv_lora + rope, h, fp8, wd)
    out.append(Spec(a + "kv_a_layernorm.weight", wd, (kv_lora,), "ones"))
    out += _linear(a + "kv_b_proj.weight", nh * (nope + v), kv_lora, fp8, wd)
    out += _linear(a + "o_proj.weight", h, nh * v, fp8, wd)
    names = ("gate_proj", "up_proj", "down_proj")
    if i < int(cfg["first_k_dense_replace"]):
        return out + _mlp(p + "mlp", names, h, int(cfg["intermediate_size"]), fp8, wd)
    e, inter = int(cfg["n_routed_experts"]), int(cfg["moe_intermediate_size"])
    out.append(Spec(p + "mlp.gate.weight", wd, (e, h), "router"))
    out.append(Spec(p + "mlp.gate.e_score_correction_bias", "F32", (e,), "bias"))
    for j in range(e):
        out += _mlp(f"{p}mlp.experts.{j}", names, h, inter, fp8, wd)
    shared = int(cfg.get("n_shared_experts") or 0)
    if shared:
        out += _mlp(p + "mlp.shared_experts", names, h, inter * shared, fp8, wd)
    return out


def tensor_specs(cfg: dict, fp8: bool = False, wd: str = "BF16") -> list[Spec]:
    """Every tensor in file order: embedding, layers 0..L-1, final norm, lm_head (as the releases order them)."""
    h, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    specs = [Spec("model.embed_tokens.weight", wd, (vocab, h), "normal")]
    for i in range(int(cfg["num_hidden_layers"])):
        specs += layer_specs(cfg, i, fp8, wd)
    specs.append(Spec("model.norm.weight", wd, (h,), "ones"))
    if not cfg.get("tie_word_embeddings"):
        specs.append(Spec("lm_head.weight", wd, (vocab, h), "normal"))
    return specs


# --- generation and writing ----------------------------------------------------------------------------------

def _seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)


def generate(spec: Spec, seed: int, device, std: float, hidden: int):
    """The tensor of ``spec`` on the CPU, contiguous (generated on ``device``)."""
    import torch

    g = torch.Generator(device=device).manual_seed(_seed(seed, spec.name))
    shape = spec.shape
    dt = {"BF16": torch.bfloat16, "F32": torch.float32}.get(spec.dtype)
    if spec.kind == "ones":
        t = torch.ones(shape, dtype=dt)
    elif spec.kind == "normal":
        t = torch.randn(shape, generator=g, device=device, dtype=dt).mul_(std)
    elif spec.kind == "router":
        t = torch.randn(shape, generator=g, device=device, dtype=dt).mul_(hidden ** -0.5)
    elif spec.kind == "bias":
        t = torch.rand(shape, generator=g, device=device, dtype=torch.float32).sub_(0.5).mul_(0.1)
    elif spec.kind == "fp8":
        t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(FP8_STD).clamp_(-448, 448)
        t = t.to(torch.float8_e4m3fn)
    elif spec.kind == "scale":
        t = torch.rand(shape, generator=g, device=device, dtype=torch.float32).sub_(0.5).mul_(0.1).add_(1.0)
        t.mul_(std / FP8_STD)
    else:
        raise ValueError(spec.kind)
    return t.to("cpu").contiguous()


def _raw(t):
    """The tensor's bytes as a buffer (no copy)."""
    import torch

    return t.view(torch.uint8).numpy()


class _Writer:
    """Appends tensors' bytes to the open file on one background thread, at most ``depth`` queued."""

    def __init__(self, depth: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: deque = deque()
        self.depth = depth

    def submit(self, f, t, expected: int) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, f, t, expected))

    @staticmethod
    def _write(f, t, expected: int) -> None:
        buf = _raw(t)
        if buf.nbytes != expected:
            raise RuntimeError(f"internal: generated {buf.nbytes} bytes, header says {expected}")
        f.write(buf)

    def drain(self, quiet: bool = False) -> None:
        while self.pending:
            fut = self.pending.popleft()
            if quiet:
                fut.exception()  # wait, but let the error already on its way win
            else:
                fut.result()

    def close(self) -> None:
        self.drain(quiet=True)
        self.pool.shutdown()


def _free_bytes(path: Path) -> int:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def write_tokenizer(out: Path, vocab: int) -> dict:
    """Tokenizer files in ``out``; -> {"bos_token_id", "eos_token_id", "kind"} with every id < vocab."""
    if vocab >= SHIPPED_VOCAB:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(SHIPPED_TOKENIZER / name, out / name)
        return {"bos_token_id": 0, "eos_token_id": 0, "kind": f"shipped tiny-mixtral byte-level BPE ({SHIPPED_VOCAB} ids)"}
    from mop_ray.zoo.tiny import build_tokenizer

    build_tokenizer(out, vocab)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    top = max(list(tok["model"]["vocab"].values()) + list(ids.values()))
    if top >= vocab:
        raise SynthError(f"internal: the trained tokenizer has id {top} >= vocab {vocab}")
    return {"bos_token_id": ids["<|bos|>"], "eos_token_id": ids["<|endoftext|>"],
            "kind": f"byte-level BPE trained with vocab_size {vocab} (mop_ray.zoo.tiny.build_tokenizer)"}


def make_synthetic(out: str | Path, preset: str, *, layers: int | None = None, dense_layers: int | None = None,
                   dtype: str = "bf16", shard_size: str | int = "5GB", vocab: int | None = None,
                   scale: str | None = None, overrides: dict | None = None, seed: int = 0, device: str = "auto",
                   overwrite: bool = False, fsync: bool = True, dry_run: bool = False, log=print) -> dict:
    """Write the checkpoint; returns a summary (bytes, seconds, GB/s, shards, config). Raises SynthError."""
    if dtype not in ("bf16", "fp8", "f32"):
        raise SynthError(f"--dtype {dtype!r}: expected bf16, fp8 or f32")
    fp8 = dtype == "fp8"
    wd = "F32" if dtype == "f32" else "BF16"
    cfg = build_config(preset, layers=layers, dense_layers=dense_layers, scale=scale, vocab=vocab,
                       overrides=overrides, fp8=fp8)
    if dtype == "f32":
        cfg["torch_dtype"] = "float32"
    specs = tensor_specs(cfg, fp8, wd)
    shards = plan_shards(specs, parse_size(shard_size))
    tensor_bytes = sum(s.nbytes for s in specs)
    # + headers (an upper bound of each JSON entry) + tokenizer and JSON files
    planned = tensor_bytes + sum(len(s.name) + 120 for s in specs) + (2 << 20)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SynthError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    replaced = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0
    free = _free_bytes(out) + replaced  # the bytes of a directory being overwritten come back first
    if dry_run:
        moe = sum(s.nbytes for s in specs if ".experts." in s.name)
        log(f"make_synthetic --dry-run: {preset}, {cfg['num_hidden_layers']} layers, {dtype}: {len(specs)} tensors in "
            f"{len(shards)} shard(s), {planned / 1e9:.2f} GB planned ({moe / 1e9:.2f} GB routed experts); "
            f"{free / 1e9:.2f} GB free at {out}")
        return {"planned_bytes": planned, "tensor_bytes": tensor_bytes, "routed_expert_bytes": moe,
                "tensors": len(specs), "shards": len(shards), "free_bytes": free, "config": cfg}
    if free < planned + (64 << 20):
        raise SynthError(f"--out {out}: needs {planned / 1e9:.2f} GB ({len(specs)} tensors, {cfg['num_hidden_layers']} "
                         f"layers) but only {free / 1e9:.2f} GB are free there")

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = write_tokenizer(out, int(cfg["vocab_size"]))
    cfg["bos_token_id"], cfg["eos_token_id"] = tok["bos_token_id"], tok["eos_token_id"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    std, hidden = float(cfg.get("initializer_range", 0.02)), int(cfg["hidden_size"])
    log(f"make_synthetic: {preset} ({'tiny' if scale == 'tiny' else 'full'} scale), {cfg['num_hidden_layers']} layers, "
        f"{dtype}, {len(specs)} tensors in {len(shards)} shard(s), {tensor_bytes / 1e9:.3f} GB -> {out} "
        f"(generating on {device})")
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    written = 0
    writer = _Writer()
    try:
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            header, order = header_layout([OutTensor(s.name, s.dtype, s.shape, [(None, 0, s.nbytes)]) for s in shard],
                                    {"format": "pt"})
            by_name = {s.name: s for s in shard}
            with open(out / name, "wb") as f:
                f.write(header)
                try:
                    for ot in order:
                        spec = by_name[ot.name]
                        writer.submit(f, generate(spec, seed, device, std, hidden), spec.nbytes)
                    writer.drain()
                finally:
                    writer.drain(quiet=True)  # no write may outlive the file
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            size = (out / name).stat().st_size
            if size != len(header) + sum(s.nbytes for s in shard):
                raise RuntimeError(f"internal: {name} has {size} bytes, its header describes {len(header)} + "
                                   f"{sum(s.nbytes for s in shard)}")
            written += size
            weight_map.update({s.name: name for s in shard})
            elapsed = time.perf_counter() - t0
            log(f"  {name}: {len(shard)} tensors, {size / 1e9:.3f} GB "
                f"(total {written / 1e9:.2f} GB, {written / 1e9 / max(elapsed, 1e-9):.2f} GB/s)")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written checkpoint is left behind
        raise
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    index = {"metadata": {"total_size": tensor_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    summary = {
        "out": str(out), "preset": preset, "scale": scale or "full", "dtype": dtype, "layers": cfg["num_hidden_layers"],
        "dense_layers": cfg.get("first_k_dense_replace", 0) if cfg["model_type"] == "deepseek_v3" else 0,
        "tensors": len(specs), "shards": len(shards), "tensor_bytes": tensor_bytes, "bytes_written": written,
        "seconds": round(seconds, 3), "gb_per_s": round(written / 1e9 / max(seconds, 1e-9), 3), "fsync": fsync,
        "device": str(device), "seed": seed, "tokenizer": tok["kind"], "torch": torch.__version__,
    }
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {written / 1e9:.3f} GB ({written} bytes) in {seconds:.2f} s: {summary['gb_per_s']:.3f} GB/s"
        f"{' incl. fsync' if fsync else ' (no fsync: page cache)'}")
    return summary


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SynthError(f"--set {item!r}: expected KEY=VALUE (VALUE is JSON, e.g. 512, null, true)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, help="decoder layers to write (default: 2)")
    ap.add_argument("--dense-layers", type=int, help="deepseek-v3: leading dense layers (first_k_dense_replace); "
                                                     "default min(3, layers-1)")
    ap.add_argument("--dtype", choices=("bf16", "fp8", "f32"), default="bf16",
                    help="fp8: block-quantised like the DeepSeek-V3 release; f32: for CPU test runs (bf16 matmuls are "
                         "slow on CPUs without bf16 units)")
    ap.add_argument("--shard-size", default="5GB", help="max bytes per shard (default 5GB, like the releases)")
    ap.add_argument("--vocab", type=int, help="vocab_size override (>= 258; < 4096 gets a trained byte-level BPE)")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full", help="tiny: same structure, miniature widths")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. --set hidden_size=512")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="where to generate: auto (cuda if available), cpu, cuda")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-fsync", action="store_true", help="do not fsync shards (GB/s then measures the page cache)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned bytes and free space; write nothing")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)
    try:
        summary = make_synthetic(args.out, args.preset, layers=args.layers, dense_layers=args.dense_layers,
                                 dtype=args.dtype, shard_size=args.shard_size, vocab=args.vocab, scale=args.scale,
                                 overrides=_parse_set(args.set), seed=args.seed, device=args.device,
                                 overwrite=args.overwrite, fsync=not args.no_fsync, dry_run=args.dry_run)
    except SynthError as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

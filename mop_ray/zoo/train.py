"""Train the small zoo MoEs on the six-domain corpus (run on a GPU; seeded; one command each).

    python -m mop_ray.zoo.train --arch tiny-mixtral  --corpus ../shared/data/corpus --out mop_ray/zoo/models/tiny-mixtral
    python -m mop_ray.zoo.train --arch tiny-deepseek --corpus ../shared/data/corpus --out mop_ray/zoo/models/tiny-deepseek

A byte-level BPE tokenizer (tokenizers) is trained on the corpus' train splits, the model is trained from
scratch on batches drawn evenly from the six domains (train splits only) for a fixed time/step budget, and
the result is saved in bf16 with its tokenizer and ``zoo.json``: the recipe, the validation perplexity per
domain and the routing profile (expert usage per domain and layer, routing entropy) that shows whether the
experts specialise. Mixtral uses the standard load-balancing loss; the DeepSeek-V3 model uses DeepSeek's
auxiliary-loss-free balancing (the ``e_score_correction_bias`` of over-used experts is lowered each step).
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


def read_docs(corpus: Path, domain: str, split: str) -> list[str]:
    with gzip.open(corpus / domain / f"{split}.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


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


def encode(tokenizer, docs: list[str]):
    import torch

    ids: list[int] = []
    for batch_start in range(0, len(docs), 64):
        for seq in tokenizer(docs[batch_start:batch_start + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


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


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    arch = dict(ARCHS[args.arch])
    tok = train_tokenizer(corpus, arch["vocab_size"], out)
    train = {d: encode(tok, read_docs(corpus, d, "train")) for d in DOMAINS}
    valid = {d: encode(tok, read_docs(corpus, d, "valid")) for d in DOMAINS}
    print(f"tokenized in {time.time() - t0:.1f}s: " + ", ".join(f"{d} {len(v) / 1e6:.2f}M" for d, v in train.items()))

    model_type = arch.pop("model_type")
    cfg = AutoConfig.for_model(model_type, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id, **arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(DEV).train()
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
    warmup = 100
    while step < args.max_steps and time.time() - t_train < args.seconds:
        frac = min(1.0, (time.time() - t_train) / args.seconds)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batch(train)
        with torch.autocast(DEV, dtype=torch.bfloat16):
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
        losses.append(float(loss))
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t_train:.0f}s", flush=True)
        step += 1

    model.eval()
    val_blocks = {d: v[: (len(v) // args.seq_len) * args.seq_len].view(-1, args.seq_len)[:64] for d, v in valid.items()}
    ppl = {}
    with torch.no_grad():
        for d, blocks in val_blocks.items():
            nll = sum(float(model(blocks[i:i + 16].to(DEV), labels=blocks[i:i + 16].to(DEV)).loss) * len(blocks[i:i + 16])
                      for i in range(0, len(blocks), 16)) / len(blocks)
            ppl[d] = math.exp(nll)
    profile = routing_profile(model, val_blocks, None)
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.save_pretrained(out, max_shard_size="4MB")
    info = {"arch": args.arch, "params": n_params, "steps": step, "tokens_seen": step * args.batch * args.seq_len,
            "train_seconds": round(time.time() - t_train, 1), "final_train_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
            "valid_ppl": ppl, "recipe": vars(args) | {"corpus": "six-domain corpus, train splits"}, **profile}
    (out / "zoo.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("arch", "params", "steps", "tokens_seen", "train_seconds", "valid_ppl")}, indent=1))


if __name__ == "__main__":
    main()

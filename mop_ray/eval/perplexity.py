"""Per-domain perplexity on held-out text.

Documents of every source (default: the embedded corpus' ``valid`` splits, never used for calibration) are
tokenized, joined with EOS and cut into ``seq_len`` blocks; the mean next-token negative log-likelihood over
all predicted tokens of a domain gives its perplexity exp(NLL). Batched, one domain at a time.
"""

from __future__ import annotations

import math

import torch

from mop_ray.data.calib import load_source, parse_spec


def domain_blocks(spec: str, tokenizer, *, seq_len: int, max_tokens: int, split: str = "valid") -> dict[str, torch.Tensor]:
    """{source: token blocks [B, seq_len]} with at most max_tokens tokens per source."""
    out = {}
    eos = tokenizer.eos_token_id
    for src in parse_spec(spec, split=split):
        ids: list[int] = []
        for text in load_source(src)["text"]:
            if text:
                ids.extend(tokenizer(text[: 8 * max_tokens], add_special_tokens=False)["input_ids"])
                if eos is not None:
                    ids.append(eos)
            if len(ids) >= max_tokens:
                break
        n = min(len(ids), max_tokens) // seq_len
        if n:
            out[src.name] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return out


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean next-token NLL and perplexity of ``model`` over ``blocks`` [B, L] (every position after the first)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].to(device)
        logits = model(ids).logits.float()  # [b, L, V]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}

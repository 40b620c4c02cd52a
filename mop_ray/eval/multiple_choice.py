"""Multiple-choice accuracy by log-likelihood: items ``{"question", "choices", "answer_index"}`` (jsonl).

Each choice is scored by the summed log-probability of its tokens after the question (``acc``) and by that
sum divided by the choice's token count (``acc_norm``), the two conventions of lm-evaluation-harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mop_ray.errors import MopError


def read_items(path: str | Path) -> list[dict]:
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        item = json.loads(line)
        if not {"question", "choices", "answer_index"} <= set(item) or not 0 <= item["answer_index"] < len(item["choices"]):
            raise MopError(f"{path}:{i + 1}: expected question, choices and a valid answer_index, found {sorted(item)}")
        items.append(item)
    return items


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[tuple[float, int]]:
    """(summed log-prob of ``c``, len(c)) for every (prefix ids ``q``, continuation ids ``c``) pair.

    ``batch_size`` sequences go through the model at once, padded on the right: under causal attention a
    token never sees the padding after it, and positions count from 0 as in an unpadded forward.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(q) + len(c) for q, c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [B, L]; 0 pads on the right
        for row, (q, c) in enumerate(chunk):
            ids[row, :len(q) + len(c)] = torch.tensor(q + c)
        logits = model(ids.to(device)).logits  # [B, L, V]
        for row, (q, c) in enumerate(chunk):
            logp = logits[row, len(q) - 1:len(q) + len(c) - 1].float().log_softmax(-1)  # [len(c), V]
            out.append((float(logp.gather(1, torch.tensor(c, device=device)[:, None]).sum()), len(c)))
    return out


def _pairs(tokenizer, question: str, choices: list[str]) -> list[tuple[list[int], list[int]]]:
    q = tokenizer(question, add_special_tokens=False)["input_ids"]
    return [(q, tokenizer(choice, add_special_tokens=False)["input_ids"]) for choice in choices]


def choice_logprobs(model, tokenizer, question: str, choices: list[str]) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of every choice continuing ``question``."""
    return continuation_logprobs(model, _pairs(tokenizer, question, choices))


def accuracy(model, tokenizer, items: list[dict], batch_size: int = 64) -> dict:
    pairs = [_pairs(tokenizer, item["question"], item["choices"]) for item in items]
    flat = continuation_logprobs(model, [p for item in pairs for p in item], batch_size)
    hits = hits_norm = 0
    for item in items:
        scores, flat = flat[:len(item["choices"])], flat[len(item["choices"]):]
        hits += int(max(range(len(scores)), key=lambda i: scores[i][0]) == item["answer_index"])
        hits_norm += int(max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1)) == item["answer_index"])
    n = max(len(items), 1)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "items": len(items)}

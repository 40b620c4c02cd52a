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
def choice_logprobs(model, tokenizer, question: str, choices: list[str]) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of every choice continuing ``question``."""
    device = next(model.parameters()).device
    q = tokenizer(question, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        c = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([q + c], device=device)
        logp = model(ids).logits.float().log_softmax(-1)[0]  # [L, V]
        positions = torch.arange(len(q) - 1, len(q) + len(c) - 1, device=device)
        out.append((float(logp[positions, ids[0, len(q):]].sum()), len(c)))
    return out


def accuracy(model, tokenizer, items: list[dict]) -> dict:
    hits = hits_norm = 0
    for item in items:
        scores = choice_logprobs(model, tokenizer, item["question"], item["choices"])
        hits += int(max(range(len(scores)), key=lambda i: scores[i][0]) == item["answer_index"])
        hits_norm += int(max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1)) == item["answer_index"])
    n = max(len(items), 1)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "items": len(items)}

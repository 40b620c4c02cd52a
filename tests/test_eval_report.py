"""Evaluation against direct transformers losses, multiple choice on constructed items, the report, the demo."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mop_ray.eval.harness import evaluate
from mop_ray.eval.multiple_choice import accuracy, choice_logprobs, continuation_logprobs, read_items
from mop_ray.eval.perplexity import domain_blocks, perplexity
from mop_ray.errors import MopError


@pytest.fixture(scope="module")
def lm(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["qwen3_moe"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_perplexity_equals_the_transformers_loss(lm):
    model, tok = lm
    blocks = domain_blocks("default", tok, seq_len=32, max_tokens=96)
    assert set(blocks) == {"code", "docs", "wiki", "literature", "math", "qa"}
    ids = blocks["math"]
    assert ids.shape == (3, 32)
    got = perplexity(model, ids, batch_size=2)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()  # mean over the 3 x 31 predicted tokens
    assert got["tokens"] == 93 and got["nll"] == pytest.approx(loss, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_choice_logprobs_match_masked_label_losses(lm):
    model, tok = lm
    question, choices = "Question: What is 2 plus 2?\nAnswer:", [" 4", " 5", " 22"]
    q = tok(question, add_special_tokens=False)["input_ids"]
    scores = choice_logprobs(model, tok, question, choices)
    for (logp, n), choice in zip(scores, choices):
        c = tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([q + c])
        labels = ids.clone()
        labels[0, : len(q)] = -100
        with torch.no_grad():
            mean_nll = model(ids, labels=labels).loss.item()
        assert n == len(c) and logp == pytest.approx(-mean_nll * len(c), rel=1e-5)


def test_batched_continuations_equal_one_at_a_time(lm):
    model, tok = lm
    texts = [("The sea is", " blue"), ("def f(x):\n   ", " return x + 1"), ("2 + 2 =", " 4"), ("Once upon", " a time there")]
    pairs = [(tok(q, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]) for q, c in texts]
    assert len({len(q) + len(c) for q, c in pairs}) > 1  # unequal lengths: right padding is exercised
    one = [continuation_logprobs(model, [p])[0] for p in pairs]
    for batch in (2, 3, 64):
        got = continuation_logprobs(model, pairs, batch_size=batch)
        assert [n for _, n in got] == [n for _, n in one]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in one], rel=1e-5)


def test_accuracy_on_items_with_known_answers(lm, tmp_path):
    model, tok = lm
    items = []
    for question, choices in [("The sea is", [" blue", " loud", " x"]), ("def f(x):\n   ", [" return x", " )))", " ;;"])]:
        scores = choice_logprobs(model, tok, question, choices)
        best = max(range(3), key=lambda i: scores[i][0])
        items.append({"question": question, "choices": choices, "answer_index": best})
        items.append({"question": question, "choices": choices, "answer_index": (best + 1) % 3})
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    assert accuracy(model, tok, read_items(path))["acc"] == 0.5
    path.write_text('{"question": "q", "choices": ["a"], "answer_index": 3}\n')
    with pytest.raises(MopError, match="valid answer_index"):
        read_items(path)


def test_evaluate_reports_domains_and_builtin_tasks(tiny_models):
    res = evaluate(tiny_models["olmoe"], seq_len=32, max_tokens=64, tasks=["arithmetic"], log=lambda *_: None)
    assert set(res["perplexity"]) == {"code", "docs", "wiki", "literature", "math", "qa"}
    assert res["multiple_choice"]["arithmetic"]["items"] == 200
    res = evaluate(tiny_models["olmoe"], data="", tasks=["hellaswag"], log=lambda *_: None)
    assert "skipped" in res["lm_eval"]  # lm-eval is not installed here, or offline


def test_demo_quick_writes_a_complete_report(tmp_path, ray_local):
    from mop_ray.demo import run_demo

    logs = []
    res = run_demo(tmp_path / "demo", quick=True, log=logs.append)
    assert set(res["results"]) == {"unpruned", "mop", "frequency"}
    page = (tmp_path / "demo" / "report.html").read_text()
    images = re.findall(r"src='([^']+)'", page)
    assert {"routing_mop.png", "routing_frequency.png", "mop_mop.png", "losses.png", "zoo_routing.png"} <= set(images)
    for img in images:
        data = (tmp_path / "demo" / img).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "arithmetic acc" in page and "unpruned" in page
    assert any("perplexity per domain" in line for line in logs)
    for method in ("mop", "frequency"):
        ev = json.loads((tmp_path / "demo" / f"pruned-{method}.run" / "eval.json").read_text())
        assert set(ev["perplexity"]) == {"code", "docs", "wiki", "literature", "math", "qa"}

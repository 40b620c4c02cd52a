"""The trained zoo models shipped in the package: layout, size, and that they are language models."""

from __future__ import annotations

import json

import pytest
import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError
from mop_ray.zoo import SHIPPED, shipped


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_a_trained_moe(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped(name)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 12 * 2**20
    ckpt = Checkpoint(path)
    info = json.loads((path / "zoo.json").read_text())
    if name == "tiny-mixtral":
        assert ckpt.family.name == "mixtral" and ckpt.num_experts == 8 and ckpt.top_k == 2
    else:
        spec = ckpt.family.router_spec(ckpt.config)
        assert ckpt.family.name == "deepseek_v3" and ckpt.num_experts >= 32 and ckpt.top_k > 2
        assert spec.n_group > 1 and spec.topk_group < spec.n_group and ckpt.moe_layers[0] == 1
    # trained: held-out perplexity far below the vocabulary size, and it was measured per domain
    assert set(info["valid_ppl"]) == {"code", "docs", "wiki", "literature", "math", "qa"}
    assert max(info["valid_ppl"].values()) < 300 and info["tokens_seen"] > 10_000_000
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def main():\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 6.0  # ln(4096) = 8.3 for a model that knows nothing


def test_experts_specialise_by_domain():
    """Expert usage differs between domains (the routing profile measured after training)."""
    info = json.loads((shipped("tiny-mixtral") / "zoo.json").read_text())
    usage = info["usage"]
    layer = "0"
    code, literature = torch.tensor(usage["code"][layer]), torch.tensor(usage["literature"][layer])
    assert (code - literature).abs().sum().item() > 0.2  # total variation distance > 0.1


def test_unknown_zoo_model():
    with pytest.raises(MopError, match="shipped models are"):
        shipped("gpt-7")

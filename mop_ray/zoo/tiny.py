"""Tiny random checkpoints of every supported family, saved exactly as the Hub ships them.

Used by the tests and ``mop-ray demo --quick``: real transformers models (random weights), saved with
``save_pretrained`` in the per-expert on-disk format with a small ``max_shard_size`` (several shards and an
index) and a real byte-level BPE tokenizer, so every code path sees what a real Mixtral or DeepSeek has.
DeepSeek-V3 also gets a multi-token-prediction layer appended the way the official release stores it.
"""

from __future__ import annotations

import json
from pathlib import Path

COMMON = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, num_experts_per_tok=2, bos_token_id=1, eos_token_id=0, pad_token_id=0,
    tie_word_embeddings=False,
)
# Per family: kwargs on top of COMMON. Dense layers, shared experts and routing groups are exercised on purpose.
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=8, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=16,
                      norm_topk_prob=True),
    "deepseek_v2": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, head_dim=8),
    "olmoe": dict(intermediate_size=32, num_experts=8),
}
TOKENIZER_TEXT = (
    "def add(a, b):\n    return a + b\n"
    "The quick brown fox jumps over the lazy dog. Mixture-of-experts models route each token to a few experts.\n"
    "Question: what is 12 + 30? Answer: 42.\n"
    "In 1905 Einstein published four papers. The river flows into the sea.\n"
)


def build_tokenizer(out: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out)


def build_tiny(family: str, out: str | Path, *, seed: int = 0, max_shard_size: str = "60KB",
               mtp_layers: int = 1, dtype: str = "float32", **overrides) -> Path:
    """Save a tiny random ``family`` model to ``out`` and return the path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    kwargs = {**COMMON, **TINY_CONFIGS[family], **overrides}
    cfg = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():  # random routers and biases so routing is not degenerate
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    build_tokenizer(out, kwargs["vocab_size"])
    if family == "deepseek_v3" and mtp_layers:
        _append_mtp_layers(out, mtp_layers, seed)
    return out


def _append_mtp_layers(out: Path, count: int, seed: int) -> None:
    """Store DeepSeek-V3 MTP layers as the official checkpoint does: model.layers.{L+j}.* in extra shards."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    cfg = json.loads((out / "config.json").read_text())
    n_layers, hidden, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    last = f"model.layers.{n_layers - 1}."
    gen = torch.Generator().manual_seed(seed + 1)
    for j in range(count):
        layer = n_layers + j
        tensors = {}
        for name, shard in index["weight_map"].items():
            if name.startswith(last):
                with safe_open(out / shard, "pt") as f:
                    tensors[f"model.layers.{layer}." + name[len(last):]] = f.get_tensor(name).clone()
        p = f"model.layers.{layer}."
        tensors[p + "enorm.weight"] = torch.ones(hidden)
        tensors[p + "hnorm.weight"] = torch.ones(hidden)
        tensors[p + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=gen) * 0.02
        tensors[p + "shared_head.norm.weight"] = torch.ones(hidden)
        tensors[p + "shared_head.head.weight"] = torch.randn(vocab, hidden, generator=gen) * 0.02
        shard = f"model-mtp-{j:02d}.safetensors"
        save_file(tensors, out / shard, metadata={"format": "pt"})
        for name, t in tensors.items():
            index["weight_map"][name] = shard
            index["metadata"]["total_size"] += t.numel() * t.element_size()
    index_path.write_text(json.dumps(index, indent=2))
    cfg["num_nextn_predict_layers"] = count
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

"""Architecture adapters on tiny random models of every family: detection, layout, router, layer loading."""

from __future__ import annotations

import pytest
import torch

from mop_ray.arch import detect, families, route
from mop_ray.arch.layer import build_layer, hf_config, rotary_embedding
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError

from conftest import FAMILIES


def load_full(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_registry_has_the_six_families():
    assert sorted(families()) == sorted(FAMILIES)


def test_unsupported_family_lists_what_is_supported():
    with pytest.raises(MopError) as e:
        detect({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    msg = str(e.value)
    assert "unsupported model family" in msg and "llama" in msg
    assert all(f in msg for f in FAMILIES) and "\n" not in msg


def test_detect_by_architectures_when_model_type_is_unknown():
    assert detect({"model_type": "x", "architectures": ["DeepseekV3ForCausalLM"]}).name == "deepseek_v3"


def test_layout_matches_the_transformers_model(tiny_models, family):
    ckpt = Checkpoint(tiny_models[family])
    model = load_full(ckpt.path)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert ckpt.family.name == family
    assert ckpt.moe_layers == moe
    assert ckpt.num_experts == model.model.layers[moe[0]].mlp.experts.gate_up_proj.shape[0] == 8
    assert ckpt.top_k == 2
    assert ckpt.mtp_layers == ([3] if family == "deepseek_v3" else [])
    assert len(set(ckpt.weight_map.values())) > 3  # really sharded
    assert set(ckpt.layer_bytes) == set(range(ckpt.num_layers)) | set(ckpt.mtp_layers)


def test_router_function_equals_the_model_router(tiny_models, family):
    ckpt = Checkpoint(tiny_models[family])
    model = load_full(ckpt.path)
    spec = ckpt.family.router_spec(ckpt.config)
    torch.manual_seed(0)
    for i in ckpt.moe_layers:
        gate = model.model.layers[i].mlp.gate
        x = torch.randn(64, model.config.hidden_size)
        with torch.no_grad():
            logits, w_ref, idx_ref = gate(x)
        bias = getattr(gate, "e_score_correction_bias", None)
        idx, w = route(spec, logits, bias)
        order_ref, order = idx_ref.sort(-1), idx.sort(-1)
        assert torch.equal(order_ref.values, order.values)
        torch.testing.assert_close(w_ref.float().gather(1, order_ref.indices), w.gather(1, order.indices))


def test_route_with_keep_mask_equals_the_physically_pruned_router(tiny_models, family):
    ckpt = Checkpoint(tiny_models[family])
    spec = ckpt.family.router_spec(ckpt.config)
    keep_ids = [0, 2, 5, 7] if spec.n_group > 1 else [1, 2, 4, 6]  # 2 per group of 4 where groups apply
    keep = torch.zeros(8, dtype=torch.bool)
    keep[keep_ids] = True
    torch.manual_seed(1)
    logits = torch.randn(128, 8) * 2
    bias = torch.rand(8) * 0.1 if spec.has_correction_bias else None
    idx_masked, w_masked = route(spec, logits, bias, keep=keep)
    pruned_bias = bias[keep_ids] if bias is not None else None
    idx_small, w_small = route(spec, logits[:, keep_ids], pruned_bias)  # renumbered 0..3
    mapped = torch.tensor(keep_ids)[idx_small]
    a, b = idx_masked.sort(-1), mapped.sort(-1)
    assert torch.equal(a.values, b.values)
    torch.testing.assert_close(w_masked.gather(1, a.indices), w_small.gather(1, b.indices))


def test_layer_built_from_safetensors_equals_the_layer_in_the_full_model(tiny_models, family):
    ckpt = Checkpoint(tiny_models[family])
    model = load_full(ckpt.path)
    captured = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: captured.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None), out)),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.model.layers)
    ]
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    cfg = hf_config(ckpt)
    rotary = rotary_embedding(ckpt, cfg)
    pos = torch.arange(16)[None].expand(2, -1)
    for i in range(ckpt.num_layers):
        layer = build_layer(ckpt, i, config=cfg)
        h_in, h_out = captured[i]
        with torch.no_grad():
            out = layer(h_in, attention_mask=None, position_ids=pos, position_embeddings=rotary(h_in, pos))
        out = out[0] if isinstance(out, tuple) else out
        h_out = h_out[0] if isinstance(h_out, tuple) else h_out
        assert (out - h_out).abs().max().item() <= 1e-6, f"layer {i}"
        assert not any(p.is_meta for p in layer.parameters())


def test_threaded_direct_expert_reads_equal_the_stacking_path(tiny_models, family, monkeypatch):
    """Experts read by threads straight into the fused tensors (plain dtypes) equal per-tensor reads stacked."""
    from mop_ray.arch import layer as layer_mod

    ckpt = Checkpoint(tiny_models[family])
    i = ckpt.moe_layers[-1]
    reads, read_into = [], layer_mod.read_into
    monkeypatch.setattr(layer_mod, "read_into", lambda info, dest: (reads.append(info.name), read_into(info, dest)))
    direct = layer_mod.layer_state_dict(ckpt, i)
    assert len(reads) == 3 * ckpt.num_experts  # every projection went the direct way
    monkeypatch.setattr(layer_mod, "_read_experts_direct", lambda *a, **k: None)
    stacked = layer_mod.layer_state_dict(ckpt, i)
    assert set(direct) == set(stacked)
    for name in direct:
        assert direct[name].dtype == stacked[name].dtype and torch.equal(direct[name], stacked[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads onto a GPU need one")
def test_experts_read_straight_onto_the_gpu_equal_the_host_read(tiny_models, family, tmp_path, monkeypatch):
    """A stage reads the fused experts through pinned chunks onto its GPU (``layer_state_dict(device=...)``): the
    same bytes as the host read, across chunk boundaries; the layer built from them equals the host-built layer
    moved; block-FP8 experts (float8 on the GPU, dequantized there) too."""
    from mop_ray.arch import layer as layer_mod
    from tests.test_fp8 import fp8_copy

    monkeypatch.setattr(layer_mod, "COPY_CHUNK", 1000)  # many chunks per projection, odd boundaries
    paths = [tiny_models[family]]
    if family == "deepseek_v3":
        paths.append(fp8_copy(tiny_models[family], tmp_path / "fp8", block=(8, 12)))
    for path in paths:
        ckpt = Checkpoint(path)
        i = ckpt.moe_layers[-1]
        on_gpu = layer_mod.layer_state_dict(ckpt, i, packed_fp8=True, device="cuda")
        host = layer_mod.layer_state_dict(ckpt, i, packed_fp8=True)
        fused = {k: v for k, v in on_gpu.items() if k.startswith("mlp.experts.")}
        fused.update({k: v[0] for k, v in on_gpu.get(layer_mod.PACKED_FP8, {}).items() if k.startswith("mlp.experts.")})
        assert len(fused) == 2 and all(t.is_cuda for t in fused.values())
        for name, t in fused.items():
            want = host[name] if name in host else host[layer_mod.PACKED_FP8][name][0]
            assert t.dtype == want.dtype and torch.equal(t.cpu().view(torch.uint8), want.view(torch.uint8)), name
        built = layer_mod.build_layer(ckpt, i, device="cuda", state_dict=on_gpu).state_dict()
        want = layer_mod.build_layer(ckpt, i, device="cuda", state_dict=host).state_dict()
        assert set(built) == set(want)
        for name, t in want.items():
            assert torch.equal(built[name], t), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="staged host-to-GPU copies need a GPU")
def test_to_device_through_pinned_chunks_equals_module_to(monkeypatch):
    """``to_device`` (two pinned chunk buffers, asynchronous copies) moves every parameter and buffer exactly as
    ``Module.to`` does, across chunk boundaries, dtypes, an empty and a non-contiguous tensor, with a dtype cast."""
    from mop_ray.arch import layer as layer_mod

    monkeypatch.setattr(layer_mod, "COPY_CHUNK", 1000)  # many chunks, odd boundaries
    gen = torch.Generator().manual_seed(0)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(77, 33, generator=gen).to(torch.bfloat16), requires_grad=False)
    m.b = torch.nn.Parameter(torch.randn(40, 41, generator=gen).T, requires_grad=False)  # non-contiguous
    m.register_buffer("c", torch.randint(0, 1000, (123,), generator=gen))
    m.register_buffer("d", torch.empty(0))
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    moved = layer_mod.to_device(m, "cuda", torch.float16)
    for k, v in moved.state_dict().items():
        assert v.is_cuda, k
        want = ref[k].to(torch.float16) if ref[k].is_floating_point() else ref[k]
        assert v.dtype == want.dtype and torch.equal(v.cpu(), want), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="staged host-to-GPU copies need a GPU")
def test_sample_rows_go_to_the_gpu_through_pinned_chunks_unchanged(monkeypatch):
    """A selection's sample rows (bfloat16 bits and float32) reach the GPU through ``host_to_device`` (pinned
    chunks, no pageable copy that would stall a stage's waves) and decode to the host decoding's values."""
    import numpy as np

    from mop_ray.arch import layer as layer_mod
    from mop_ray.observe.records import decode_rows

    monkeypatch.setattr(layer_mod, "COPY_CHUNK", 4096)
    staged = []
    real = layer_mod._staged_copy
    monkeypatch.setattr(layer_mod, "_staged_copy", lambda src, dst: (staged.append(len(src)), real(src, dst)))
    rows = torch.randn(300, 70, generator=torch.Generator().manual_seed(0))
    bits = rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for values in (bits, rows.numpy()):
        got = decode_rows(values, "cuda")
        assert got.is_cuda and got.dtype == torch.float32
        assert torch.equal(got.cpu(), decode_rows(values, "cpu"))
    assert staged == [bits.nbytes, rows.numpy().nbytes]
    blocks = [bits[:100], bits[100:100], bits[100:]]  # row blocks (read-only views of a mapped file in a selection)
    for b in blocks:
        b.flags.writeable = False
    assert torch.equal(decode_rows(blocks, "cuda").cpu(), decode_rows(bits, "cpu"))
    assert staged[2:] == [bits[:100].nbytes, bits[100:].nbytes]

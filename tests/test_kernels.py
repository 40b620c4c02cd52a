"""The fused Triton kernels (mop_ray.arch.kernels) against their torch equivalents: compiled on a GPU, else run
by Triton's CPU interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 where there is no GPU)."""

import os

import pytest
import torch

from mop_ray.arch import kernels

pytest.importorskip("triton")


@pytest.fixture
def dev(monkeypatch):
    """The device the kernels run on in this test: the GPU, else the CPU through Triton's interpreter."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton was imported without its interpreter")
        monkeypatch.setenv("MOP_RAY_FUSED", "interpret")
    else:
        monkeypatch.delenv("MOP_RAY_FUSED", raising=False)
    assert kernels.fused(torch.empty(1, device=device))
    return device


def reference(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setenv("MOP_RAY_FUSED", "0")
        assert not kernels.fused(args[0])
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,inter", [(5, 1100), (3, 64), (0, 32)])
def test_swiglu_matches_torch(dev, monkeypatch, dtype, rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(rows)) * 3).to(dev, dtype)
    act = torch.nn.SiLU()
    got = kernels.swiglu(gate_up, act)
    want = reference(monkeypatch, kernels.swiglu, gate_up, act)
    assert got.shape == (rows, inter) and got.dtype == dtype
    # the interpreter rounds float32 to bfloat16 by truncation (a GPU to nearest): one bf16 step apart at most
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


def test_swiglu_keeps_other_activations_and_strided_inputs_on_torch(dev):
    gate_up = torch.randn(4, 16, device=dev)
    gelu = torch.nn.GELU()
    g, u = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.swiglu(gate_up, gelu), gelu(g) * u)
    strided = torch.randn(16, 4, device=dev).t()  # [4, 16], not contiguous
    g, u = strided.chunk(2, dim=-1)
    assert torch.equal(kernels.swiglu(strided, torch.nn.SiLU()), torch.nn.functional.silu(g) * u)


@pytest.mark.parametrize("hidden", [96, 5000])  # one block, and a row longer than the kernel's 4096-wide block
def test_error_and_norm_match_torch_in_their_columns(dev, monkeypatch, hidden):
    gen = torch.Generator().manual_seed(hidden)
    T, E, e = 7, 3, 1
    f = torch.randn(T, hidden, generator=gen).to(dev, torch.bfloat16)
    base = torch.randn(T, hidden, generator=gen).to(dev)
    c = torch.rand(T, E, generator=gen).to(dev)
    tables = [torch.full((T, E), -1.0, device=dev) for _ in range(4)]  # err, norm (fused), err, norm (torch)
    kernels.error_and_norm(f, base, c[:, e], tables[0][:, e], tables[1][:, e])
    reference(monkeypatch, kernels.error_and_norm, f, base, c[:, e], tables[2][:, e], tables[3][:, e])
    for got, want in ((tables[0], tables[2]), (tables[1], tables[3])):
        assert (got[:, [0, 2]] == -1).all()  # only expert e's column written
        torch.testing.assert_close(got[:, e], want[:, e], rtol=1e-5, atol=1e-5)
    expect = (base + c[:, e, None] * f.double()).pow(2).sum(-1)  # Eq. 5 in float64
    torch.testing.assert_close(tables[0][:, e].double(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens,experts,k,hidden,shared", [(9, 8, 2, 96, False), (5, 6, 4, 5000, True),
                                                             (0, 4, 2, 32, False)])
def test_combine_matches_torch_and_the_gated_sum_over_all_experts(dev, monkeypatch, tokens, experts, k, hidden,
                                                                   shared):
    gen = torch.Generator().manual_seed(tokens + hidden)
    outputs = torch.randn(experts, tokens, hidden, generator=gen).to(dev, torch.bfloat16)  # [E, T, H]
    idx = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :k].to(dev)  # [T, k] distinct experts
    w = torch.rand(tokens, k, generator=gen).to(dev)  # [T, k] float32
    sh = torch.randn(tokens, hidden, generator=gen).to(dev, torch.bfloat16) if shared else None
    got = kernels.combine(outputs, idx, w, sh, torch.bfloat16)
    want = reference(monkeypatch, kernels.combine, outputs, idx, w, sh, torch.bfloat16)
    assert got.shape == (tokens, hidden) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)  # one bf16 step (the interpreter truncates)
    gate = torch.zeros(tokens, experts, dtype=torch.float64, device=dev).scatter_(1, idx, w.double())  # [T, E]
    exact = torch.einsum("te,eth->th", gate, outputs.double()) + (sh.double() if shared else 0)
    torch.testing.assert_close(want.double(), exact, rtol=1.6e-2, atol=1e-2)  # the gated sum over all E


def test_observer_statistics_are_the_same_with_the_kernels(dev, monkeypatch, tiny_models, family):
    """A tiny model's first MoE block observed through its all-experts pass (``forward``) and with the block's own
    output (``observe``), kernels on and off: the same output and statistics."""
    from mop_ray.arch.layer import build_layer
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.observe.observer import MoEObserver

    ckpt = Checkpoint(tiny_models[family])
    moe = build_layer(ckpt, ckpt.moe_layers[0]).mlp.to(dev)
    spec = ckpt.family.router_spec(ckpt.config)
    T = 32
    x = torch.randn(T, int(ckpt.config["hidden_size"]), generator=torch.Generator().manual_seed(0)).to(dev)
    source, block, pos = torch.arange(T) % 2, torch.zeros(T, dtype=torch.long), torch.arange(T)

    def observed():
        ours, stock = (MoEObserver(0, ckpt.family, spec, ckpt.num_experts, 2, None) for _ in range(2))
        with torch.no_grad():
            z = ours.forward(moe, x, source, None, block, pos)
            stock.observe(moe, x, moe(x[None])[0], source, None, block, pos)
        return z, ours.stats, stock.stats

    z_fused, *fused_stats = observed()
    with monkeypatch.context() as m:
        m.setenv("MOP_RAY_FUSED", "0")
        z_torch, *torch_stats = observed()
    torch.testing.assert_close(z_fused, z_torch, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_stats, torch_stats):
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_prepare_launches_each_kernel_once_and_nothing_when_they_are_off(dev, monkeypatch):
    launched = []
    for name in ("swiglu_kernel", "error_norm_kernel", "combine_kernel"):
        kernel = getattr(kernels._triton(), name)
        monkeypatch.setattr(kernels._triton(), name, Recorded(kernel, name, launched))
    assert kernels.prepare(dev) > 0
    assert launched == ["swiglu_kernel", "error_norm_kernel", "combine_kernel"]
    monkeypatch.setenv("MOP_RAY_FUSED", "0")
    assert kernels.prepare(dev) == 0.0 and len(launched) == 3


class Recorded:
    """A jitted kernel whose launches (``kernel[grid](...)``) are recorded by name, then run."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_a_kernel_triton_cannot_compile_falls_back_to_torch_once(dev, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "_failed", [])

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError("no such architecture")
            return launch

    monkeypatch.setattr(kernels._triton(), "swiglu_kernel", Broken())
    gate_up = torch.randn(3, 64, device=dev)
    g, u = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.swiglu(gate_up, torch.nn.SiLU()), torch.nn.functional.silu(g) * u)
    assert not kernels.fused(gate_up)  # off for the rest of the process: the error kernel too
    kernels.swiglu(gate_up, torch.nn.SiLU())
    err = capsys.readouterr().err
    assert err.count("fused kernel swiglu_kernel failed") == 1 and "no such architecture" in err

"""Fused GPU kernels (Triton) for the elementwise work between the experts' matmuls, with their torch equivalents.

On a Mixtral-8x7B-shaped layer the waves' micro-batch call spends ~35 ms in matmuls and ~15 ms more in
elementwise passes over [T, I] and [T, H] tensors (benchmarks/RESULTS.md, "Start-up with the bytecode cache"):
SwiGLU as torch writes it reads the gate and up halves through strided views and makes two [T, I] temporaries, and
the observer's per-expert error and norm take five passes over [T, H] float32 tensors. The two kernels here do each
in one pass, and a third assembles the block's output from the experts' outputs:

- ``swiglu(gate_up, act)``: act(g)·u from the gate/up projection [T, 2I] → [T, I] (reads 2·T·I, writes T·I);
- ``error_and_norm(f, base, c, err, norm)``: per token ‖base + c·f‖² and ‖f‖ (MoP Eq. 5 and the expert
  activation norm) into columns of [T, E] tables, reading f and base once;
- ``combine(outputs, idx, w, shared, dtype)``: the block's output Σ_j w_j·f_{idx_j} (+ shared) from the stacked
  expert outputs [E, T, H], reading only each token's k routed rows (torch's loop over the E experts read all of
  them with a float32 accumulator: ~2.7 GB a Mixtral-shaped call, 1.5 ms on an H100).

They run on CUDA tensors where Triton imports, unless ``MOP_RAY_FUSED=0``; everywhere else (CPU, activations other
than SiLU, strided inputs, a GPU Triton cannot compile for) the torch code computes the same values. Rounding
follows torch's: SiLU in float32 rounded to the input dtype before the product, the error summed in float32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import torch


def _silu_like(act) -> bool:
    """Whether ``act`` is SiLU (torch's module or transformers' ``SiLUActivation``, whichever a version builds)."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


@functools.cache
def _triton():
    """The module of jitted kernels (``_triton_kernels``), or None where Triton does not import."""
    try:
        from mop_ray.arch import _triton_kernels
    except Exception:  # noqa: BLE001 - no Triton (CPU wheels of torch): the torch path
        return None
    return _triton_kernels


_failed: list[str] = []  # the first launch error: the kernels are off for the rest of the process


def _launch(name: str, grid: tuple, *args, **meta) -> bool:
    """Launch kernel ``name``; False (the caller computes with torch) where Triton cannot compile it for this GPU
    (an older architecture, another backend): said once on stderr, then the kernels stay off in this process."""
    try:
        getattr(_triton(), name)[grid](*args, **meta)
        return True
    except Exception as e:  # noqa: BLE001 - Triton's compile errors have no common base; torch computes instead
        if not _failed:
            _failed.append(f"{type(e).__name__}: {e}")
            print(f"mop-ray: fused kernel {name} failed, computing with torch from here on: {_failed[0]}",
                  file=sys.stderr, flush=True)
        return False


def fused(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like ``t``. ``MOP_RAY_FUSED``: ``0`` never; unset (or ``1``) on
    CUDA tensors where Triton imports; ``interpret`` on CPU tensors too, through Triton's interpreter, which
    needs ``TRITON_INTERPRET=1`` set before Triton's first import (the tests on machines without a GPU)."""
    mode = os.environ.get("MOP_RAY_FUSED", "1")
    if mode == "0" or _failed:
        return False
    if t.device.type != "cuda" and not (mode == "interpret" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _triton() is not None


def swiglu(gate_up: torch.Tensor, act) -> torch.Tensor:
    """act(gate)·up for the gate/up projection gate_up [T, 2I] (gate first, as transformers' fused experts lay it
    out) -> [T, I] in gate_up's dtype."""
    if _silu_like(act) and gate_up.dim() == 2 and gate_up.is_contiguous() and fused(gate_up):
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
        block = 1024
        grid = (rows, _triton().triton.cdiv(inter, block))
        if rows == 0 or _launch("swiglu_kernel", grid, gate_up, out, inter, BLOCK=block, num_warps=4):
            return out
    gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
    return act(gate) * up


def error_and_norm(f: torch.Tensor, base: torch.Tensor, c: torch.Tensor, err: torch.Tensor,
                   norm: torch.Tensor) -> None:
    """For one expert's outputs f [T, H] (compute dtype), base [T, H] float32 and its single-expert gate c [T]:
    err[t] = ‖base_t + c_t·f_t‖² (MoP Eq. 5, E_e(x) − Z = c·f_e + base) and norm[t] = ‖f_t‖₂, written into the
    float32 [T] views err and norm (columns of [T, E] tables), both summed in float32."""
    if (fused(f) and f.is_contiguous() and base.is_contiguous() and base.dtype == torch.float32
            and c.dtype == err.dtype == norm.dtype == torch.float32 and err.stride(0) == norm.stride(0)):
        rows, hidden = f.shape
        block = min(4096, _triton().triton.next_power_of_2(hidden))
        if rows == 0 or _launch("error_norm_kernel", (rows,), f, base, c, err, norm, hidden, c.stride(0),
                                err.stride(0), BLOCK=block, num_warps=8):
            return
    # float32 without a float32 copy of f: both ops upcast as they read (the same values as f.float())
    norm.copy_(torch.linalg.vector_norm(f, dim=-1, dtype=torch.float32))
    err.copy_(torch.addcmul(base, c[:, None], f).square().sum(dim=-1))


def combine(outputs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, shared: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """The MoE block's output z [T, H] in ``dtype`` from the stacked expert outputs ``outputs`` [E, T, H] (every
    expert on every token), the routed ids ``idx`` [T, k] and their float32 gates ``w`` [T, k], plus the shared
    experts' ``shared`` [T, H] (or None): shared + Σ_j w[:, j]·outputs[idx[:, j], t], summed in float32 in the
    order of j (the same sum in both paths), then rounded to ``dtype``."""
    _, tokens, hidden = outputs.shape  # [E, T, H]
    k = idx.shape[1]
    if (fused(outputs) and outputs.is_contiguous() and w.dtype == torch.float32
            and (shared is None or shared.is_contiguous())):
        z = torch.empty(tokens, hidden, dtype=dtype, device=outputs.device)  # [T, H]
        block = min(1024, _triton().triton.next_power_of_2(hidden))
        grid = (tokens, _triton().triton.cdiv(hidden, block))
        if tokens == 0 or _launch("combine_kernel", grid, outputs, idx.contiguous(), w.contiguous(),
                                  outputs if shared is None else shared, z, tokens, hidden, k,
                                  HAS_SHARED=shared is not None, BLOCK=block, num_warps=4):
            return z
    rows = torch.arange(tokens, device=outputs.device)  # [T]
    acc = torch.zeros(tokens, hidden, dtype=torch.float32, device=outputs.device)  # [T, H]
    if shared is not None:
        acc += shared
    for j in range(k):
        acc.addcmul_(w[:, j, None], outputs[idx[:, j], rows])  # each token's j-th routed expert, [T, H]
    return acc.to(dtype)


def prepare(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Launch the kernels once on tiny ``dtype`` inputs on ``device`` (a side stream), so this process has loaded
    Triton's driver, its launchers and the kernels before a real call needs them: ~0.5 s in a fresh process even
    with the kernels in Triton's cache (benchmarks/triton_first_use.py). A stage does it beside its imports.
    -> seconds taken (0.0 where the kernels do not run on ``device``)."""
    t0 = time.perf_counter()
    if not fused(torch.empty(0, device=device)):
        return 0.0
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        swiglu(torch.zeros(1, 32, device=device, dtype=dtype), torch.nn.SiLU())  # [1, 2I], I = 16
        f = torch.zeros(1, 16, device=device, dtype=dtype)  # [T, H], H = 16
        c, err, norm = (torch.zeros(1, 2, device=device) for _ in range(3))  # [T, E], E = 2
        error_and_norm(f, torch.zeros(1, 16, device=device), c[:, 0], err[:, 0], norm[:, 0])
        combine(f[None].expand(2, 1, 16).contiguous(), torch.zeros(1, 1, dtype=torch.long, device=device),
                c[:, :1], None, dtype)  # [E, T, H], [T, k], [T, k]
    if stream is not None:
        stream.synchronize()
    return time.perf_counter() - t0

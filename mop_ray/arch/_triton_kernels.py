"""The Triton kernels behind ``mop_ray.arch.kernels`` (imported only through it, where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    """out[t, i] = silu(gu[t, i])·gu[t, I + i]; grid (T, ⌈I / BLOCK⌉)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded as torch's
    tl.store(out_ptr + row * inter + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def error_norm_kernel(f_ptr, base_ptr, c_ptr, err_ptr, norm_ptr, hidden, c_stride, out_stride, BLOCK: tl.constexpr):
    """err[t] = ‖base[t] + c[t]·f[t]‖², norm[t] = ‖f[t]‖ over the hidden size, in float32; grid (T,)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.load(c_ptr + row * c_stride)
    sq_err = tl.zeros([BLOCK], dtype=tl.float32)
    sq_f = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        f = tl.load(f_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(base_ptr + row * hidden + cols, mask=mask, other=0.0)
        d = b + c * f  # E_e(x) − Z on this token's row
        sq_err += d * d
        sq_f += f * f
    tl.store(err_ptr + row * out_stride, tl.sum(sq_err, axis=0))
    tl.store(norm_ptr + row * out_stride, tl.sqrt(tl.sum(sq_f, axis=0)))


@triton.jit
def combine_kernel(f_ptr, idx_ptr, w_ptr, shared_ptr, z_ptr, tokens, hidden, k,
                   HAS_SHARED: tl.constexpr, BLOCK: tl.constexpr):
    """z[t] = shared[t] + Σ_j w[t, j]·f[idx[t, j], t], summed in float32 in the order of j and rounded to z's dtype;
    f [E, T, H], idx and w [T, k]; grid (T, ⌈H / BLOCK⌉)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    if HAS_SHARED:
        acc = tl.load(shared_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(k):
        e = tl.load(idx_ptr + row * k + j).to(tl.int64)
        w = tl.load(w_ptr + row * k + j)
        f = tl.load(f_ptr + (e * tokens + row) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        acc += w * f
    tl.store(z_ptr + row * hidden + cols, acc.to(z_ptr.dtype.element_ty), mask=mask)

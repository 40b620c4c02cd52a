"""Build one decoder layer on ``meta`` and load exactly its tensors from safetensors (no full-model load).

transformers 5.x keeps routed experts fused in memory (``mlp.experts.gate_up_proj [E, 2I, H]`` =
cat(gate, up) per expert, ``mlp.experts.down_proj [E, H, I]``) while checkpoints store them per expert
(``experts.{e}.gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2`` under ``block_sparse_moe``);
this module does the stacking the library's own loader does. Block-FP8 weights (DeepSeek-V3's release:
float8_e4m3fn + ``weight_scale_inv`` per 128x128 block) are dequantized to the layer's compute dtype for
calibration; the writer still copies them verbatim.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from contextlib import ExitStack

import numpy as np
import torch

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.safetensors_io import pread_full
from mop_ray.errors import MopError


def hf_config(ckpt: Checkpoint, attn_implementation: str = "sdpa", experts_implementation: str = "grouped_mm",
              experts: int | None = None):
    """The transformers config with attention and experts kernels set explicitly, as ``from_pretrained`` does.

    Left unset, a standalone layer silently ran non-causal attention and a different experts kernel.
    ``experts`` overrides the routed-expert count (one layer of a non-uniform checkpoint).
    """
    from transformers import AutoConfig

    if ckpt.experts_per_layer is None and experts is None:
        cfg = AutoConfig.from_pretrained(ckpt.path)
    else:  # a non-uniform checkpoint's config.json is deliberately unknown to AutoConfig: build from the dict
        cfg = ckpt.family.config_class().from_dict(ckpt.family.patch_config(ckpt.config, experts or ckpt.num_experts))
    cfg._attn_implementation = attn_implementation
    cfg._experts_implementation = experts_implementation
    return cfg


SCALE_SUFFIX = "weight_scale_inv"


def _check_scale(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    rows, cols = -(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1])
    if tuple(scale_inv.shape) != (rows, cols):
        raise MopError(f"FP8 weight {tuple(weight.shape)} with {block[0]}x{block[1]} blocks needs a [{rows}, {cols}] "
                       f"weight_scale_inv, found {list(scale_inv.shape)}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Block-FP8 weight [out, in] times its per-block scale [ceil(out/b0), ceil(in/b1)] (DeepSeek-V3 format)."""
    _check_scale(weight, scale_inv, block)
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return (weight.float() * scale).to(dtype)


def _block_index(size: int, block: int) -> torch.Tensor:
    """The scale block of each of ``size`` rows (or columns) [size]."""
    return torch.arange(size) // block


def pack_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> tuple:
    """A ``PACKED_FP8`` entry for one block-FP8 weight [out, in]: dequantized later where it computes."""
    _check_scale(weight, scale_inv, block)
    rows, cols = _block_index(weight.shape[0], block[0]), _block_index(weight.shape[1], block[1])
    return weight[None], scale_inv.float()[None], rows, cols, dtype, tuple(weight.shape)


def dequantize_experts(weight: torch.Tensor, scale_inv: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       dtype: torch.dtype, chunk: int = 8) -> torch.Tensor:
    """Fused block-FP8 experts weight [E, R, C] times their scales [E, Rs, Cs] on the weight's device, ``chunk``
    experts at a time; ``rows`` [R] / ``cols`` [C] name each row's / column's scale block. The same products as
    ``dequantize_fp8`` per expert (bit for bit)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # [E, R, C]
    rows, cols = rows.to(weight.device), cols.to(weight.device)
    for a in range(0, weight.shape[0], chunk):
        scale = scale_inv[a:a + chunk].float().index_select(1, rows).index_select(2, cols)  # [e, R, C]
        out[a:a + chunk] = (weight[a:a + chunk].float() * scale).to(dtype)
    return out


COMPUTE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
# layer_state_dict(packed_fp8=True): {param: (fp8 [E, R, C], scale_inv [E, Rs, Cs], row blocks [R], column blocks [C],
# dtype, the parameter's shape)} — fused experts (E of them) and single weights (E = 1) alike
PACKED_FP8 = "fp8 weights"


def compute_dtype(ckpt: Checkpoint, names: list[str]) -> torch.dtype:
    """The layer's own dtype: that of most of its unquantised tensors (norms, router: bf16 in DeepSeek-V3)."""
    dtypes = [ckpt.tensors[n].dtype for n in names if not n.endswith(SCALE_SUFFIX)]
    plain = [COMPUTE_DTYPES[d] for d in dtypes if d in COMPUTE_DTYPES]
    return Counter(plain).most_common(1)[0][0] if plain else torch.bfloat16


def _read(ckpt: Checkpoint, names: list[str], dtype: torch.dtype, packed: dict | None = None) -> dict[str, torch.Tensor]:
    """The named tensors; block-FP8 weights come back dequantized to ``dtype`` (their scales consumed), or with
    ``packed`` go there instead as ``pack_fp8`` entries."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {}
        for name in names:
            info = ckpt.tensors[name]
            f = handles.get(info.path) or handles.setdefault(info.path, stack.enter_context(safe_open(info.path, "pt")))
            out[name] = f.get_tensor(name)
    block = tuple((ckpt.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    for scale in [n for n in out if n.endswith(SCALE_SUFFIX)]:
        w = scale[: -len(SCALE_SUFFIX)] + "weight"
        if w not in out:
            raise MopError(f"{ckpt.path}: {scale} has no weight {w}")
        if packed is not None:
            packed[w] = pack_fp8(out.pop(w), out.pop(scale), block, dtype)
        else:
            out[w] = dequantize_fp8(out[w], out.pop(scale), block, dtype)
    return out


READ_THREADS = 4


def read_into(info, dest: torch.Tensor) -> None:
    """Read one tensor's bytes from its safetensors file straight into ``dest`` (contiguous, same dtype and size):
    one kernel copy from the page cache, no mmap faults, no intermediate tensor; releases the GIL. A CUDA ``dest``
    is filled through this thread's pinned chunks (``_read_into_device``)."""
    want = dest.numel() * dest.element_size()
    if want != info.nbytes:
        raise MopError(f"{info.path}: {info.name} has {info.nbytes} bytes, expected {want}")
    if dest.device.type == "cuda":
        return _read_into_device(info, dest.view(-1).view(torch.uint8))
    done = pread_full(info.path, memoryview(dest.view(-1).view(torch.uint8).numpy()), info.start)
    if done != info.nbytes:
        raise MopError(f"{info.path}: truncated while reading {info.name} ({done} of {info.nbytes} bytes)")


def _read_into_device(info, dest: torch.Tensor) -> None:
    """A tensor's bytes from its file into device bytes ``dest`` ([n] uint8), chunk by chunk through this thread's
    pinned buffers (``_upload_chunks``) on this thread's own stream: each chunk read (the kernel copying from the
    page cache) while the previous one's copy to the GPU runs — one host copy per byte instead of two (file → host
    tensor → pinned chunk)."""
    def fill(buf: torch.Tensor, start: int) -> None:
        done = pread_full(info.path, memoryview(buf.numpy()), info.start + start)
        if done != len(buf):
            raise MopError(f"{info.path}: truncated while reading {info.name} ({start + done} of {info.nbytes} bytes)")

    stream = thread_stream(dest.device)
    _upload_chunks(dest, fill, stream)
    stream.synchronize()  # on the device before any other stream uses it


def _read_experts_direct(ckpt: Checkpoint, prefix: str, per_expert, by_expert: dict[int, list[str]],
                         projs: tuple[str, str, str], fp8: bool = False, device: torch.device | None = None
                         ) -> tuple | None:
    """Fused gate_up [E, 2I, H] and down [E, H, I] read by ``READ_THREADS`` threads, each projection's bytes
    straight into its slice (on ``device`` when it is a GPU, through pinned chunks), and None; or with ``fp8``, for
    block-FP8 experts, those fused float8 weights and their fused scales [E, 2·ceil(I/b0), ceil(H/b1)] and
    [E, ceil(H/b0), ceil(I/b1)] (on the host), to be dequantized where they compute (``dequantize_experts``).
    None when the experts are not same-dtype tensors of these shapes (the stacking path then reads them one by
    one, or names the problem)."""
    gate_n, up_n, down_n = projs
    infos: dict[int, dict[str, object]] = {}
    scaled = False
    for e, names in by_expert.items():
        got = {}
        for name in names:
            m = per_expert.match(name[len(prefix):])
            if m.group(3):  # a weight_scale_inv: block-FP8
                if not fp8:
                    return None
                scaled = True
            got[m.group(2) + (m.group(3) or "")] = ckpt.tensors[name]
        infos[e] = got
    first = infos[0]
    scale_names = tuple(p + "_scale_inv" for p in projs) if scaled else ()
    dtypes = {got[p].dtype for got in infos.values() for p in projs if p in got}
    known = FP8_DTYPES if scaled else COMPUTE_DTYPES
    if len(dtypes) != 1 or next(iter(dtypes)) not in known or set(first) != set(projs + scale_names):
        return None
    inter, hidden = first[gate_n].shape
    want = {gate_n: (inter, hidden), up_n: (inter, hidden), down_n: (hidden, inter)}
    if scaled:
        b0, b1 = tuple((ckpt.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        blocks = lambda r, c: (-(-r // b0), -(-c // b1))  # noqa: E731
        want.update({gate_n + "_scale_inv": blocks(inter, hidden), up_n + "_scale_inv": blocks(inter, hidden),
                     down_n + "_scale_inv": blocks(hidden, inter)})
        if {got[p].dtype for got in infos.values() for p in scale_names} != {"F32"}:
            return None
    for e, got in infos.items():
        if set(got) != set(want) or any(tuple(got[p].shape) != want[p] for p in want):
            return None  # let the stacking path name the problem
    dtype = known[next(iter(dtypes))]
    n = len(infos)
    on = device if device is not None and device.type == "cuda" else None  # the weights' device (scales: host)
    gate_up = torch.empty(n, 2 * inter, hidden, dtype=dtype, device=on)  # [E, 2I, H]
    down = torch.empty(n, hidden, inter, dtype=dtype, device=on)  # [E, H, I]
    jobs = [(infos[e][gate_n], gate_up[e, :inter]) for e in range(n)] + \
           [(infos[e][up_n], gate_up[e, inter:]) for e in range(n)] + [(infos[e][down_n], down[e]) for e in range(n)]
    scales = None
    if scaled:
        (rg, cg), (rd, cd) = want[gate_n + "_scale_inv"], want[down_n + "_scale_inv"]
        gate_up_s = torch.empty(n, 2 * rg, cg, dtype=torch.float32)  # [E, 2·ceil(I/b0), ceil(H/b1)]
        down_s = torch.empty(n, rd, cd, dtype=torch.float32)  # [E, ceil(H/b0), ceil(I/b1)]
        jobs += [(infos[e][gate_n + "_scale_inv"], gate_up_s[e, :rg]) for e in range(n)] + \
                [(infos[e][up_n + "_scale_inv"], gate_up_s[e, rg:]) for e in range(n)] + \
                [(infos[e][down_n + "_scale_inv"], down_s[e]) for e in range(n)]
        gate_rows = torch.cat([_block_index(inter, b0), rg + _block_index(inter, b0)])  # gate's row blocks, then up's
        scales = ((gate_up_s, gate_rows, _block_index(hidden, b1)),
                  (down_s, _block_index(hidden, b0), _block_index(inter, b1)))
    jobs.sort(key=lambda j: (str(j[0].path), j[0].start))  # file order: sequential reads per shard
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        list(pool.map(lambda j: read_into(*j), jobs))
    return gate_up, down, scales


def layer_state_dict(ckpt: Checkpoint, i: int, packed_fp8: bool = False,
                     device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Module-named tensors of decoder layer i, experts stacked into the fused layout, FP8 dequantized.

    Experts are read straight into the preallocated fused tensors (by several threads, each projection's bytes
    into its slice), so host memory peaks at about one copy of the layer, not two; ``device``, a GPU, gets the
    fused experts read onto it through pinned chunks instead (the rest stays on the host, for ``build_layer``).
    ``packed_fp8``: block-FP8 weights (routed experts fused, attention, shared experts, dense MLPs) stay float8 under
    ``PACKED_FP8`` (half the bytes to move; ``build_layer`` dequantizes them on the layer's device — on the host,
    one thread took ~2 minutes per DeepSeek-V3 layer for the experts alone).
    """
    fam = ckpt.family
    prefix = fam.layer_prefix(i)
    names = sorted(ckpt.layer_tensors(i))
    if not names:
        raise MopError(f"{ckpt.path}: no tensors for layer {i} (expected names starting with {prefix!r})")
    dtype = compute_dtype(ckpt, names)
    gate_n, up_n, down_n = fam.expert_projs
    per_expert = re.compile(rf"^{re.escape(fam.moe_module)}\.experts\.(\d+)\.({gate_n}|{up_n}|{down_n})\.weight(_scale_inv)?$")
    by_expert: dict[int, list[str]] = {}
    other = []
    for name in names:
        if m := per_expert.match(name[len(prefix):]):
            by_expert.setdefault(int(m.group(1)), []).append(name)
        else:
            other.append(name)
    def local(name: str) -> str:
        name = name[len(prefix):]
        return "mlp." + name[len(fam.moe_module) + 1:] if name.startswith(fam.moe_module + ".") else name

    packed = {} if packed_fp8 else None
    sd: dict[str, torch.Tensor] = {local(name): t for name, t in _read(ckpt, other, dtype, packed).items()}
    if packed:
        sd[PACKED_FP8] = {local(name): entry for name, entry in packed.items()}
    if not by_expert:
        return sd
    n = ckpt.experts_in(i)
    if sorted(by_expert) != list(range(n)):
        raise MopError(f"{ckpt.path}: layer {i} has an incomplete expert set (expected {n} experts x 3 projections)")
    direct = _read_experts_direct(ckpt, prefix, per_expert, by_expert, (gate_n, up_n, down_n), fp8=packed_fp8,
                                  device=torch.device(device) if device is not None else None)
    if direct is not None:
        gate_up, down, scales = direct
        if scales is None:
            sd["mlp.experts.gate_up_proj"], sd["mlp.experts.down_proj"] = gate_up, down
        else:
            sd.setdefault(PACKED_FP8, {}).update({name: (w, *scale, dtype, tuple(w.shape)) for name, w, scale in (
                ("mlp.experts.gate_up_proj", gate_up, scales[0]), ("mlp.experts.down_proj", down, scales[1]))})
        return sd
    gate_up = down = None
    for e in range(n):
        t = {per_expert.match(k[len(prefix):]).group(2): v for k, v in _read(ckpt, by_expert[e], dtype).items()
             if not k.endswith(SCALE_SUFFIX)}
        if set(t) != {gate_n, up_n, down_n}:
            raise MopError(f"{ckpt.path}: layer {i} expert {e} has projections {sorted(t)}, expected {[gate_n, up_n, down_n]}")
        if gate_up is None:
            inter, hidden = t[gate_n].shape
            gate_up = torch.empty(n, 2 * inter, hidden, dtype=t[gate_n].dtype)  # [E, 2I, H]
            down = torch.empty(n, hidden, inter, dtype=t[down_n].dtype)  # [E, H, I]
        gate_up[e, : t[gate_n].shape[0]] = t[gate_n]
        gate_up[e, t[gate_n].shape[0]:] = t[up_n]
        down[e] = t[down_n]
    sd["mlp.experts.gate_up_proj"] = gate_up
    sd["mlp.experts.down_proj"] = down
    return sd


def dtype_named(name: str | None) -> torch.dtype | None:
    """A ``--dtype`` value ("bfloat16", "float32", ...) as a torch dtype; None or "auto": the checkpoint's."""
    return None if name in (None, "auto") else getattr(torch, name)


def meta_layer(ckpt: Checkpoint, i: int, config) -> torch.nn.Module:
    """Decoder layer i's class built from ``config`` on the meta device: shapes only, no storage."""
    cls = getattr(ckpt.family.modeling(), ckpt.family.decoder_layer_class)
    with torch.device("meta"):
        return cls(config, layer_idx=i)


def build_layer(ckpt: Checkpoint, i: int, *, config=None, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Decoder layer i of ``ckpt``, built on meta and filled with its own tensors only (eval mode).

    ``state_dict``: the layer's ``layer_state_dict``, when the caller has read it already (e.g. ahead of time).
    """
    layer = meta_layer(ckpt, i, config or hf_config(ckpt))
    sd = dict(layer_state_dict(ckpt, i, packed_fp8=True) if state_dict is None else state_dict)
    for name, (w, scale_inv, rows, cols, dt, shape) in sd.pop(PACKED_FP8, {}).items():  # float8 to the device,
        sd[name] = dequantize_experts(host_to_device(w, device), host_to_device(scale_inv, device),  # dequantized there
                                      rows, cols, dt).reshape(shape)
    try:
        layer.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise MopError(f"{ckpt.path}: layer {i} tensors do not match {ckpt.family.decoder_layer_class}: {first}") from None
    leftover = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if leftover:
        raise MopError(f"{ckpt.path}: layer {i}: no checkpoint tensors for {leftover}")
    return to_device(layer, device, dtype).eval()


COPY_CHUNK = 64 << 20  # bytes per host-to-GPU copy
_STAGING = threading.local()  # per thread: two pinned chunk buffers, their copies' events, a side stream


def to_device(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module.to(device, dtype)`` without stalling other threads' GPU work: a copy from pageable host memory holds
    the CUDA driver for its whole length, so a layer loading in a background thread (1-2 GB per tensor for a
    Mixtral layer) blocked every kernel launch of the layer computing meanwhile — one micro-batch's experts took
    6.5 s instead of 38 ms on an H200 (benchmarks/RESULTS.md). Tensors go through two pinned ``COPY_CHUNK``
    buffers instead: a host memcpy into one while the other's asynchronous copy runs on the current stream."""
    device = torch.device(device)
    if device.type != "cuda":
        return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        out = host_to_device(t, device)
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out

    return module._apply(move)


def host_to_device(t, device: str | torch.device) -> torch.Tensor:
    """A host tensor ``t`` on ``device`` — or the rows of host arrays ``t`` (a list of numpy [n_i, ...] of one
    dtype, e.g. views of a memory-mapped file) concatenated there [Σ n_i, ...]. On CUDA staged through pinned
    chunks (``to_device``): a pageable copy would hold the driver and stall every other thread's kernels meanwhile
    (a stage selecting beside its waves uploads ~1.5 GB of sample rows per Mixtral layer)."""
    device = torch.device(device)
    parts = t if isinstance(t, list) else None
    if parts is None and t.device.type == "cuda" and device.type == "cuda":
        return t.to(device)  # read onto the GPU already (``layer_state_dict(device=...)``)
    if device.type != "cuda":
        return torch.cat([torch.from_numpy(np.array(p)) for p in parts]) if parts is not None else t.to(device)
    if parts is None:
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        if t.numel():
            _staged_copy(t.reshape(-1).view(torch.uint8), out.view(-1).view(torch.uint8))
        return out
    dtype = torch.from_numpy(np.empty(0, dtype=parts[0].dtype)).dtype
    out = torch.empty((sum(len(p) for p in parts),) + parts[0].shape[1:], dtype=dtype, device=device)
    row = 0
    for p in parts:
        if p.size:
            _staged_copy(np.ascontiguousarray(p).reshape(-1).view(np.uint8), out[row:row + len(p)].reshape(-1).view(torch.uint8))
        row += len(p)
    return out


def _upload_chunks(dst: torch.Tensor, fill, stream: torch.cuda.Stream) -> None:
    """Device bytes ``dst`` ([n] uint8) in ``COPY_CHUNK`` pieces through this thread's two pinned buffers:
    ``fill(buf, start)`` writes bytes [start, start + len(buf)) into one buffer while the other's asynchronous copy
    to the GPU runs on ``stream``."""
    if getattr(_STAGING, "size", 0) != COPY_CHUNK:
        _STAGING.buffers = [torch.empty(COPY_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        _STAGING.events = [torch.cuda.Event() for _ in range(2)]
        _STAGING.size = COPY_CHUNK
    with torch.cuda.stream(stream):
        for j, start in enumerate(range(0, len(dst), COPY_CHUNK)):
            buf, event = _STAGING.buffers[j % 2], _STAGING.events[j % 2]
            event.synchronize()  # this buffer's previous copy has left it
            n = min(COPY_CHUNK, len(dst) - start)
            fill(buf[:n], start)
            dst[start:start + n].copy_(buf[:n], non_blocking=True)  # on ``stream``
            event.record(stream)


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's own side stream on ``device``, made once (reads straight to the GPU copy on it, the observer
    its sampled rows to the host: not on the caller's stream)."""
    if not hasattr(_STAGING, "streams"):
        _STAGING.streams = {}
    if device not in _STAGING.streams:
        _STAGING.streams[device] = torch.cuda.Stream(device)
    return _STAGING.streams[device]


def _staged_copy(src, dst: torch.Tensor) -> None:
    """Host bytes ``src`` (a uint8 tensor, or numpy array: read-only memory is fine) → device bytes ``dst`` ([n]
    uint8) through this thread's pinned buffers, on the current stream."""
    def fill(buf: torch.Tensor, start: int) -> None:
        if isinstance(src, np.ndarray):
            buf.numpy()[:] = src[start:start + len(buf)]  # a host memcpy (numpy lets go of the GIL)
        else:
            buf.copy_(src[start:start + len(buf)])  # a host memcpy: no CUDA call

    _upload_chunks(dst, fill, torch.cuda.current_stream(dst.device))


def rotary_embedding(ckpt: Checkpoint, config=None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model's weightless rotary module, needed to run any decoder layer standalone."""
    config = config or hf_config(ckpt)
    cls = getattr(ckpt.family.modeling(), ckpt.family.rotary_class)
    return cls(config).to(device)

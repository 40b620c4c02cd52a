"""The on-disk record of one MoE layer: ``run_dir/records/layer=NNN/{stats.parquet,sample.arrow}``.

``stats.parquet``: one row per (source, expert): ``source`` (string), ``expert`` (int32), ``tokens`` (int64,
tokens of that source), and the float64 sums of ``STAT_FIELDS`` (see ``mop_ray.observe.observer``).
``sample.arrow`` (Arrow IPC file, one record batch per micro-batch): one row per sampled token: ``block``,
``pos`` (int32), ``source`` (string), ``x`` (fixed_size_list[H]: the MoE input; float32, or uint16 holding the
bfloat16 bits when the layer ran in bfloat16 — exact, half the bytes to copy, write and read back), ``logits``
(fixed_size_list<float32>[E]) and either ``z`` (the block's original output, as ``x``) or, for layers of at most
``mop_ray.methods.products.RECORD_UP_TO`` experts, ``gram`` (fixed_size_list[(E+2)²], float32 or float64: the row's
expert outputs' and y's Gram, ``row_products``) and ``yy`` (float64, ‖y‖²), so that selection runs no expert again
and needs no z (``records_outputs``: half a Mixtral layer's sample). The sample is Arrow IPC rather than Parquet
because it is
gigabytes of dense floats: Parquet encodes a definition level per list element (measured on an H100 node:
the stage's sample writing took 8x its compute), while IPC writes the buffers as they are and is read back
memory-mapped. Rows are written by a background thread so the stage's next micro-batch overlaps the write.

Both are written to a temporary name and renamed, so a file that exists is complete; a re-run overwrites.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mop_ray.errors import MopError

STAT_FIELDS = ("freq", "reap_sum", "ean_sum", "err_sum", "p_sum", "plogp_sum")


SOURCE_NAME_BYTES = 16  # allowance per row for the ``source`` string (the corpus' names are shorter)


def records_products(n_experts: int) -> bool:
    """Whether a layer of ``n_experts`` records each sampled row's Gram and ‖y‖² (up to ``RECORD_UP_TO`` experts)."""
    from mop_ray.methods.products import RECORD_UP_TO  # here: mop_ray.methods imports this module

    return n_experts <= RECORD_UP_TO


def records_outputs(n_experts: int) -> bool:
    """Whether a layer of ``n_experts`` records its sampled rows' outputs z: only where it records no products,
    which are all selection needs z for; ``MOP_RAY_RECORD_OUTPUTS=1`` keeps them anyway (checks that run the
    experts on the sample again, forced short candidate lists)."""
    return not records_products(n_experts) or os.environ.get("MOP_RAY_RECORD_OUTPUTS", "0") not in ("", "0")


def sample_row_bytes(hidden: int, n_experts: int, dtype: torch.dtype) -> int:
    """Bytes one sampled row takes in ``sample.arrow`` (its columns' buffers as ``SampleWriter`` writes them) for a
    layer computing in ``dtype``: x and, where recorded, z (bf16 bits, else float32), float32 logits, int32 block
    and pos, the source name (offset + ``SOURCE_NAME_BYTES``) and, up to ``RECORD_UP_TO`` experts, the Gram and
    ‖y‖²."""
    from mop_ray.methods.products import gram_dtype, product_dtypes

    act = 2 if dtype == torch.bfloat16 else 4
    row = (1 + records_outputs(n_experts)) * hidden * act + 4 * n_experts + 4 + 4 + 4 + SOURCE_NAME_BYTES
    if records_products(n_experts):
        row += (n_experts + 2) ** 2 * gram_dtype(product_dtypes(dtype, "cpu")[1]).itemsize + 8
    return row


def layer_dir(run_dir: str | Path, layer: int) -> Path:
    return Path(run_dir) / "records" / f"layer={layer:03d}"


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] rows as a fixed-size list column: uint16 (bfloat16 bits) stays uint16, anything else float32."""
    values = np.ascontiguousarray(values, dtype=np.uint16 if values.dtype == np.uint16 else np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bits on the host, [N, D] uint16 (what ``SampleWriter`` stores as bfloat16)."""
    return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def host_rows(t) -> np.ndarray:
    """Sample rows as stored: a bfloat16 tensor as its bits (uint16), another tensor as float32, numpy as it is."""
    if isinstance(t, np.ndarray):
        return t
    return bf16_bits(t) if t.dtype == torch.bfloat16 else t.float().numpy()


def decode_rows(values: np.ndarray | list[np.ndarray], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A sample matrix — or its row blocks, concatenated — as a ``dtype`` tensor (None: as stored) on ``device``;
    uint16 rows are bfloat16 bits, decoded on the device (half the bytes over PCIe). Copies to a GPU go through
    pinned chunks (``host_to_device``), straight from the blocks (read-only views of a mapped file are fine)."""
    from mop_ray.arch.layer import host_to_device

    parts = values if isinstance(values, list) else [values]
    bits = parts[0].dtype == np.uint16
    parts = [p.view(np.int16) if bits else p for p in parts]
    if isinstance(values, list):
        host = parts
    else:
        host = torch.from_numpy(parts[0] if parts[0].flags.writeable else parts[0].copy())
    out = host_to_device(host, device)
    out = out.view(torch.bfloat16) if bits else out
    return out if dtype is None else out.to(dtype)


class SampleWriter:
    """Streams sampled rows of one layer into ``sample.arrow`` (a record batch per micro-batch, written by a
    background thread; at most ``max_pending`` batches wait in memory). Rows come as numpy arrays or host
    tensors (bfloat16 ones are stored as their bits); ``ready``, an event the thread waits for first, lets a
    device-to-host copy into pinned memory finish while the caller goes on."""

    def __init__(self, directory: Path, sources: list[str], max_pending: int = 2):
        self.directory, self.sources = directory, sources
        self.tmp = directory / f".sample.{os.getpid()}.arrow"
        self.sink = self.writer = None
        self.rows = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-writer")
        self.pending: list = []
        self.max_pending = max_pending

    def write(self, x, z, logits, source, block, pos, ready=None, gram=None, yy=None) -> None:
        """``z``: the rows' outputs, or None when not recorded; ``gram`` [N, E+2, E+2] and ``yy`` [N]: the rows'
        expert products (``row_products``), when recorded."""
        self.rows += len(block)
        while len(self.pending) >= self.max_pending:
            self.pending.pop(0).result()  # re-raises a failed write here
        self.pending.append(self.pool.submit(self._write, x, z, logits, source, block, pos, ready, gram, yy))

    def _write(self, x, z, logits, source, block, pos, ready=None, gram=None, yy=None) -> None:
        if ready is not None:
            ready.synchronize()
        columns = {
            "block": pa.array(block.astype(np.int32)), "pos": pa.array(pos.astype(np.int32)),
            "source": pa.array([self.sources[i] for i in source], pa.string()),
            "x": _fixed(host_rows(x)), **({"z": _fixed(host_rows(z))} if z is not None else {}),
            "logits": _fixed(host_rows(logits)),
        }
        if gram is not None:  # float32 or float64, as computed
            g = np.ascontiguousarray(gram.numpy() if isinstance(gram, torch.Tensor) else gram)
            columns["gram"] = pa.FixedSizeListArray.from_arrays(pa.array(g.reshape(-1)), g.shape[1] * g.shape[2])
            columns["yy"] = pa.array(np.asarray(yy.numpy() if isinstance(yy, torch.Tensor) else yy, dtype=np.float64))
        table = pa.table(columns)
        if self.writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".sample.*.arrow"):  # an earlier attempt's (a lost stage, a full disk)
                stale.unlink(missing_ok=True)
            self.sink = pa.OSFile(str(self.tmp), "wb")
            self.writer = pa.ipc.new_file(self.sink, table.schema)
        self.writer.write_table(table)

    def close(self) -> Path | None:
        for f in self.pending:
            f.result()
        self.pending.clear()
        self.pool.shutdown(wait=True)
        if self.writer is None:
            return None
        self.writer.close()
        self.sink.close()
        final = self.directory / "sample.arrow"
        os.replace(self.tmp, final)
        return final


def write_stats(directory: Path, sources: list[str], tokens: np.ndarray, stats: dict[str, np.ndarray]) -> Path:
    n_sources, n_experts = stats[STAT_FIELDS[0]].shape
    cols = {
        "source": pa.array([s for s in sources for _ in range(n_experts)], pa.string()),
        "expert": pa.array(np.tile(np.arange(n_experts, dtype=np.int32), n_sources)),
        "tokens": pa.array(np.repeat(tokens.astype(np.int64), n_experts)),
    }
    cols.update({f: pa.array(stats[f].reshape(-1)) for f in STAT_FIELDS})
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".stats.{os.getpid()}.parquet"
    pq.write_table(pa.table(cols), tmp)
    final = directory / "stats.parquet"
    os.replace(tmp, final)
    return final


@dataclass
class LayerStats:
    """Per-source statistics of one layer: ``by_source[field]`` is [S, E]; ``total(field)`` sums sources."""

    layer: int
    sources: list[str]
    tokens: np.ndarray  # [S]
    by_source: dict[str, np.ndarray]

    def total(self, field: str) -> np.ndarray:
        return self.by_source[field].sum(axis=0)  # [E]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def n_experts(self) -> int:
        return self.by_source[STAT_FIELDS[0]].shape[1]


def read_stats(run_dir: str | Path, layer: int) -> LayerStats:
    table = pq.read_table(layer_dir(run_dir, layer) / "stats.parquet")
    expert = table["expert"].to_numpy()
    n_experts = int(expert.max()) + 1
    src_col = table["source"].to_pylist()
    sources = list(dict.fromkeys(src_col))
    n_sources = len(sources)
    tokens = table["tokens"].to_numpy().reshape(n_sources, n_experts)[:, 0]
    by_source = {f: table[f].to_numpy().reshape(n_sources, n_experts) for f in STAT_FIELDS}
    return LayerStats(layer, sources, tokens, by_source)


class LayerSample:
    """One layer's sampled rows, memory-mapped from ``sample.arrow``: ``x``, ``z`` [N, H] (float32, or uint16 holding
    bfloat16 bits; z only where recorded, ``has_outputs``) and ``logits`` [N, E] float32 as numpy, combined from the
    file's record batches on first use; ``tensor`` moves one to a GPU batch by batch straight from the mapping (no
    host copy of the whole matrix); ``source``, ``block``, ``pos``: per row; ``products``: the rows' Grams."""

    def __init__(self, table: pa.Table):
        self.table = table  # its buffers are views of the mapped file
        self._matrices: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def _column(self, name: str) -> pa.ChunkedArray:
        if name == "z" and not self.has_outputs:
            raise MopError("this layer's sample holds no outputs z: a layer that records its rows' expert products "
                           "needs none; re-run observe with MOP_RAY_RECORD_OUTPUTS=1 to keep them")
        return self.table[name]

    def batches(self, name: str) -> list[np.ndarray]:
        """``name``'s rows per record batch, [n_i, D] read-only views of the mapped file."""
        col = self._column(name)
        return [c.flatten().to_numpy().reshape(len(c), col.type.list_size) for c in col.chunks if len(c)]

    @property
    def has_outputs(self) -> bool:
        """Whether the rows' outputs z were recorded (``records_outputs``)."""
        return "z" in self.table.column_names

    def matrix(self, name: str) -> np.ndarray:
        """``name``'s rows [N, D], a writable host copy (made once)."""
        if name not in self._matrices:
            col = self._column(name)
            parts = self.batches(name)
            empty = np.empty((0, col.type.list_size), dtype=col.type.value_type.to_pandas_dtype())
            self._matrices[name] = np.concatenate(parts) if parts else empty
        return self._matrices[name]

    x = property(lambda self: self.matrix("x"))
    z = property(lambda self: self.matrix("z"))
    logits = property(lambda self: self.matrix("logits"))

    @cached_property
    def source(self) -> list[str]:
        return self.table["source"].to_pylist()

    @cached_property
    def block(self) -> np.ndarray:  # [N] int32
        return self.table["block"].to_numpy()

    @cached_property
    def pos(self) -> np.ndarray:  # [N] int32
        return self.table["pos"].to_numpy()

    @property
    def has_products(self) -> bool:
        """Whether the observer recorded each row's expert products (``gram``, ``yy``)."""
        return "gram" in self.table.column_names

    def products(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded per-row Grams [N, E+2, E+2] (float32 or float64, as recorded) and ‖y‖² [N] float64 on
        ``device`` (``mop_ray.methods.products.row_products``)."""
        side = self.table["logits"].type.list_size + 2  # E experts and y's two parts
        yy = torch.from_numpy(self.table["yy"].to_numpy().copy()).to(device)  # [N]: a copy, the mapping is read-only
        return self.tensor("gram", device, dtype=None).view(len(self), side, side), yy

    def tensor(self, name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """``x``, ``z``, ``logits`` (or ``gram``) as a ``dtype`` tensor (None: as stored) on ``device`` (bfloat16 bits
        decoded there)."""
        parts = self.batches(name) if torch.device(device).type == "cuda" and name not in self._matrices else []
        return decode_rows(parts or self.matrix(name), device, dtype)


def read_sample(run_dir: str | Path, layer: int) -> LayerSample:
    """``sample.arrow`` of ``layer``, mapped with its pages populated up front (one call, not a fault per page)."""
    with open(layer_dir(run_dir, layer) / "sample.arrow", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    return LayerSample(pa.ipc.open_file(pa.py_buffer(mapped)).read_all())


class LayerRecords:
    """Lazy access to one layer's records for a method: ``.stats`` and ``.sample`` load on first use."""

    def __init__(self, run_dir: str | Path, layer: int):
        self.run_dir, self.layer = Path(run_dir), layer
        self._stats: LayerStats | None = None
        self._sample: LayerSample | None = None

    @property
    def stats(self) -> LayerStats:
        if self._stats is None:
            self._stats = read_stats(self.run_dir, self.layer)
        return self._stats

    @property
    def sample(self) -> LayerSample:
        if self._sample is None:
            self._sample = read_sample(self.run_dir, self.layer)
        return self._sample

"""The on-disk record of one MoE layer: ``run_dir/records/layer=NNN/{stats.parquet,sample.arrow}``.

``stats.parquet``: one row per (source, expert): ``source`` (string), ``expert`` (int32), ``tokens`` (int64,
tokens of that source), and the float64 sums of ``STAT_FIELDS`` (see ``mop_ray.observe.observer``).
``sample.arrow`` (Arrow IPC file, one record batch per micro-batch): one row per sampled token: ``block``,
``pos`` (int32), ``source`` (string), ``x``, ``z`` (fixed_size_list[H]: MoE input and original output;
float32, or uint16 holding the bfloat16 bits when the layer ran in bfloat16 — exact, half the bytes to copy,
write and read back), ``logits`` (fixed_size_list<float32>[E]). The sample is Arrow IPC rather than Parquet because it is
gigabytes of dense floats: Parquet encodes a definition level per list element (measured on an H100 node:
the stage's sample writing took 8x its compute), while IPC writes the buffers as they are and is read back
memory-mapped. Rows are written by a background thread so the stage's next micro-batch overlaps the write.

Both are written to a temporary name and renamed, so a file that exists is complete; a re-run overwrites.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

STAT_FIELDS = ("freq", "reap_sum", "ean_sum", "err_sum", "p_sum", "plogp_sum")


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


def decode_rows(values: np.ndarray, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A sample matrix as a ``dtype`` tensor on ``device``; uint16 rows are bfloat16 bits, decoded on the device
    (half the bytes over PCIe). Copies to a GPU go through pinned chunks (``host_to_device``)."""
    from mop_ray.arch.layer import host_to_device

    if values.dtype == np.uint16:
        return host_to_device(torch.from_numpy(values.view(np.int16)), device).view(torch.bfloat16).to(dtype)
    return host_to_device(torch.from_numpy(np.ascontiguousarray(values)), device).to(dtype)


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

    def write(self, x, z, logits, source, block, pos, ready=None) -> None:
        self.rows += len(block)
        while len(self.pending) >= self.max_pending:
            self.pending.pop(0).result()  # re-raises a failed write here
        self.pending.append(self.pool.submit(self._write, x, z, logits, source, block, pos, ready))

    def _write(self, x, z, logits, source, block, pos, ready=None) -> None:
        if ready is not None:
            ready.synchronize()
        x, z, logits = host_rows(x), host_rows(z), host_rows(logits)
        table = pa.table({
            "block": pa.array(block.astype(np.int32)), "pos": pa.array(pos.astype(np.int32)),
            "source": pa.array([self.sources[i] for i in source], pa.string()),
            "x": _fixed(x), "z": _fixed(z), "logits": _fixed(logits),
        })
        if self.writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
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


@dataclass
class LayerSample:
    x: np.ndarray  # [N, H] MoE inputs: float32, or uint16 bfloat16 bits (use ``tensor``)
    z: np.ndarray  # [N, H] original MoE outputs, as x
    logits: np.ndarray  # [N, E] float32 router logits
    source: list[str]
    block: np.ndarray  # [N] int32
    pos: np.ndarray  # [N] int32

    def tensor(self, name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """``x``, ``z`` or ``logits`` as a ``dtype`` tensor on ``device`` (bfloat16 bits decoded there)."""
        return decode_rows(getattr(self, name), device, dtype)


def read_sample(run_dir: str | Path, layer: int) -> LayerSample:
    table = pa.ipc.open_file(pa.memory_map(str(layer_dir(run_dir, layer) / "sample.arrow"))).read_all()

    def matrix(name):  # writable: a single record batch comes back as a read-only view of the mapped file
        col = table[name].combine_chunks()
        arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        return arr if arr.flags.writeable else arr.copy()

    return LayerSample(matrix("x"), matrix("z"), matrix("logits"), table["source"].to_pylist(),
                       table["block"].to_numpy(), table["pos"].to_numpy())


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

"""Byte-level safetensors reading and streamed writing.

The pruned writer never materialises tensors: it parses source headers, plans which byte ranges each output
tensor is made of (a kept expert's whole tensor, or the kept rows of a router), and copies those ranges into
output shards whose headers are known before the first byte is written. Peak memory is one copy buffer,
whatever the dtype (bf16, fp8 and its ``weight_scale_inv`` are copied verbatim), and dropped experts' bytes
are never read.

Format (https://github.com/huggingface/safetensors): ``u64 little-endian header length N``, ``N`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data;
offsets are relative to the end of the header and the data of all tensors tile ``[0, total)`` with no gaps.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mop_ray.errors import MopError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation refuses larger headers too
COPY_CHUNK = 16 * 1024 * 1024
COPY_BUFFERS = 3  # chunks in flight per shard being written (read ahead, written, hashed)
WRITE_CHUNK = 8 * 1024 * 1024  # their size: 24 MB per shard writer, below one small layer (tests/test_memory.py)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a safetensors file (absolute file offsets)."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def row_range(self, row: int) -> tuple[int, int]:
        """(absolute offset, nbytes) of ``tensor[row]`` (row-major, so every row is contiguous)."""
        row_bytes = self.nbytes // self.shape[0]
        return self.start + row * row_bytes, row_bytes


def pread_full(path: str | os.PathLike, buf: memoryview, offset: int) -> int:
    """Read ``buf.nbytes`` bytes of ``path`` from ``offset`` into ``buf`` (positioned reads, no seek; the GIL is
    released while the kernel copies); -> the bytes read, fewer only at the end of the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < buf.nbytes:
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got <= 0:
                break
            done += got
        return done
    finally:
        os.close(fd)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data; raise MopError if it is corrupt."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MopError(f"{path}: corrupt safetensors file: expected an 8-byte header length, found {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise MopError(f"{path}: corrupt safetensors header: declared length {n} but the file has {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise MopError(f"{path}: cannot read safetensors file: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MopError(f"{path}: corrupt safetensors header: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise MopError(f"{path}: corrupt safetensors header: expected a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MopError(f"{path}: corrupt safetensors header: entry {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPE_SIZES:
            raise MopError(f"{path}: unsupported dtype {dtype!r} for tensor {name!r} (known: {', '.join(DTYPE_SIZES)})")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (0 <= b <= e <= data_len) or e - b != expected:
            raise MopError(
                f"{path}: corrupt safetensors header: {name!r} {dtype}{list(shape)} needs {expected} bytes, "
                f"offsets [{b}, {e}) in a data section of {data_len} bytes"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + b, e - b)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


@dataclass
class OutTensor:
    """One tensor of an output shard: its final name, dtype, shape and the source byte ranges it is made of."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[tuple[Path, int, int]]  # (source file, absolute offset, nbytes), concatenated in order

    @property
    def nbytes(self) -> int:
        return sum(p[2] for p in self.pieces)


def header_layout(tensors: list[OutTensor], metadata: dict[str, str]) -> tuple[bytes, list[OutTensor]]:
    """Header bytes and the data order. Larger itemsizes first keeps every tensor aligned to its itemsize."""
    order = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t.dtype], t.name))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, like the reference writer
    return struct.pack("<Q", len(raw)) + raw, order


def write_shard(path: str | os.PathLike, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> str:
    """Stream ``tensors`` into a new safetensors file by copying their source byte ranges; return its sha256.

    Three threads overlap the work (hashlib and file I/O release the GIL): one reads the next chunks from the
    sources, the caller writes chunk i while another thread hashes it, so a shard costs about the slowest of
    read, write and hash instead of their sum. At most ``COPY_BUFFERS`` chunks of ``WRITE_CHUNK`` bytes are in memory.
    """
    import hashlib
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    header, order = header_layout(tensors, metadata or {"format": "pt"})
    digest = hashlib.sha256(header)
    free: queue.Queue = queue.Queue()
    for _ in range(COPY_BUFFERS):
        free.put(bytearray(WRITE_CHUNK))
    filled: queue.Queue = queue.Queue()
    stop = threading.Event()

    def read_all() -> None:  # -> (buffer, length) chunks in output order, then None; an exception ends it too
        handles: dict[Path, object] = {}
        try:
            for t in order:
                for src, offset, nbytes in t.pieces:
                    f = handles.get(src) or handles.setdefault(src, open(src, "rb"))
                    f.seek(offset)
                    left = nbytes
                    while left:
                        buf = free.get()
                        if stop.is_set():
                            return
                        got = f.readinto(memoryview(buf)[: min(left, WRITE_CHUNK)])
                        if not got:
                            raise MopError(f"{src}: file ended early while copying tensor {t.name!r}")
                        filled.put((buf, got))
                        left -= got
            filled.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the writing thread, which raises it
            filled.put(e)
        finally:
            for f in handles.values():
                f.close()

    reader = threading.Thread(target=read_all, name="shard-read", daemon=True)
    reader.start()
    try:
        with open(path, "wb") as out, ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-hash") as hasher:
            out.write(header)
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                buf, got = item
                view = memoryview(buf)[:got]
                hashed = hasher.submit(digest.update, view)  # in order: one hashing thread
                out.write(view)
                hashed.result()
                free.put(buf)
    finally:
        stop.set()
        free.put(bytearray(0))  # wakes a reader waiting for a buffer
        reader.join()
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

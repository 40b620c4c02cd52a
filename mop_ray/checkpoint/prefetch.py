"""Read a stage's next layers into the OS page cache ahead of the loader, within a byte window.

A stage imports transformers (6-12 s on the GPU machines measured) before it can build a layer, and its loader
reads only one layer ahead into process memory (host RAM stays ~2 layers). Meanwhile the disk would idle. The
``Prefetcher`` reads the following layers' bytes in the background into a small scratch buffer and drops them:
what stays is the kernel's page cache, which is reclaimable and not the process's memory, so the loader's own read
of those layers is a memory copy. It stays at most ``window`` bytes of layers ahead of the layer being loaded.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.safetensors_io import pread_full

CHUNK = 16 << 20  # bytes per read
THREADS = 4  # concurrent reads (the read floor in benchmarks/speed.py uses 4 too)


def default_window() -> int:
    """Bytes of layers read ahead: ``MOP_RAY_PREFETCH_GB`` if set (0 turns it off), else an eighth of the memory
    available now shared by the node's GPUs (one stage each), at most 16 GiB."""
    if "MOP_RAY_PREFETCH_GB" in os.environ:
        return int(float(os.environ["MOP_RAY_PREFETCH_GB"]) * 2**30)
    return min(16 << 30, _available() // (8 * _gpus_on_node()))


def _available() -> int:
    """MemAvailable in bytes (0 when unknown: no read-ahead)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _gpus_on_node() -> int:
    """NVIDIA GPUs of this machine (not only the ones this process sees), 1 when unknown."""
    try:
        return max(1, len(os.listdir("/proc/driver/nvidia/gpus")))
    except OSError:
        return 1


def layer_ranges(ckpt: Checkpoint, i: int) -> list[tuple[str, int, int]]:
    """(file, offset, bytes) of layer i's tensors in file order, adjacent ranges merged."""
    spans = sorted((str(t.path), t.start, t.nbytes) for t in ckpt.layer_tensors(i).values())
    merged: list[list] = []
    for path, start, n in spans:
        if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == start:
            merged[-1][2] += n
        else:
            merged.append([path, start, n])
    return [tuple(m) for m in merged]


class Prefetcher:
    """Reads ``layers`` in order in a daemon thread; ``loading(j)`` says the loader has reached ``layers[j]`` (the
    window counts from there); ``close()`` stops it. ``read_bytes`` counts what it read."""

    def __init__(self, ckpt: Checkpoint, layers: list[int], window: int | None = None):
        self.ckpt, self.layers = ckpt, list(layers)
        self.window = default_window() if window is None else window
        self.sizes = [sum(n for _, _, n in layer_ranges(ckpt, i)) for i in self.layers]
        self._starts = [sum(self.sizes[:j]) for j in range(len(self.sizes) + 1)]  # each layer's offset
        self.read_bytes = 0
        self._at, self._stop = 0, False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="layer-prefetch", daemon=True)
        if self.window > 0:
            self._thread.start()

    def loading(self, j: int) -> None:
        with self._cond:
            self._at = j
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _allowed(self, j: int, end: int) -> bool:
        """A read of layer j ending ``end`` bytes into the stage's layers may start when the bytes after the layer
        loading, up to ``end``, fit the window (a layer larger than the window is read ahead in part)."""
        return j <= self._at or end - self._starts[min(self._at + 1, len(self.sizes))] <= self.window

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="prefetch-read") as pool:
            for j, i in enumerate(self.layers):
                if j == 0:  # the loader reads the first layer itself, at once
                    continue
                pending = []
                for chunk, end in self._chunks(j, i):
                    with self._cond:
                        while not self._stop and not self._allowed(j, end):
                            self._cond.wait()
                        if self._stop or j < self._at:  # stopped, or the loader is past this layer
                            break
                    pending.append(pool.submit(_read, chunk))
                    if len(pending) >= 2 * THREADS:
                        self.read_bytes += pending.pop(0).result()
                self.read_bytes += sum(f.result() for f in pending)
                if self._stop:
                    return

    def _chunks(self, j: int, i: int):
        """Layer i's (file, offset, bytes) reads of at most CHUNK, each with where it ends in the stage's bytes."""
        end = self._starts[j]
        for path, start, n in layer_ranges(self.ckpt, i):
            for s in range(start, start + n, CHUNK):
                size = min(CHUNK, start + n - s)
                end += size
                yield (path, s, size), end


_SCRATCH = threading.local()


def _read(chunk: tuple[str, int, int]) -> int:
    """Read one range into this thread's scratch buffer (the page cache keeps it); 0 when the file cannot be read
    (the loader reports that)."""
    path, start, n = chunk
    if len(getattr(_SCRATCH, "buf", b"")) < n:
        _SCRATCH.buf = bytearray(max(n, CHUNK))
    try:
        return pread_full(path, memoryview(_SCRATCH.buf)[:n], start)
    except OSError:
        return 0

"""End-to-end speed of the real mop-ray job on one machine, against measured hardware floors.

    python benchmarks/speed.py --model /data/mixtral-2l --keep 4 --out-json mixtral.json          (GPU)
    python benchmarks/speed.py --model /tmp/mx-tiny --keep 4 --tokens 4096 --seq-len 256 --sample 2048 --device cpu

One run does, in order:
(a) floors: a large matmul's TFLOP/s on the device in the job's compute dtype (in a child process, so the
    driver never holds GPU memory); the disk's read GB/s over the checkpoint's own shards after dropping them
    from the page cache (fsync + ``posix_fadvise(DONTNEED)`` per file; ``mincore`` reports how much was still
    resident, so "cache dropped" is measured, not assumed); the disk's write GB/s (fsync'ed) in the work dir.
(b) the job: ``actors.coordinator.PruneJob`` + ``run`` (method ``mop`` by default) on the checkpoint, once per
    ``--gpus N`` value with N pipeline stages (one per GPU, as the coordinator places them: a PACK placement
    group of one ``{"GPU": 1}`` bundle per stage when the cluster has that many GPUs). The page cache of the
    shards is dropped before each run so the stages read from disk (``--page-cache warm``: read into it instead,
    for the pipeline's scaling where one disk would bind several GPUs). Collected: the coordinator's per-phase
    timings (``run()``'s return value and ``pruning.json``'s ``timings``), tokens/s, peak GPU memory
    (``torch.cuda.max_memory_allocated`` in every stage actor and selection task, plus ``nvidia-smi`` polling
    for the whole device), peak host memory (RSS and PSS of the driver, Ray's workers and Ray's own
    processes, polled from /proc and summed).
(c) per phase, ``time / max(compute floor, read floor, write floor)``, formulas below.
(d) ``--enu-compare``: ``benchmarks/enu_speed.py``'s comparison (all experts once = floor, mop-ray's set
    scorer, NAEE's masked forward per candidate set) on the first MoE layer of this checkpoint, with that
    layer's real weights and its recorded calibration sample as inputs (softmax routers without groups only).

Results: JSON to ``--out-json``, a markdown table to stdout.

How the numbers are obtained without changing mop-ray: the coordinator's stage-actor class and selection
task are swapped, in the driver, for thin subclasses/wrappers (``BenchShard``, ``bench_select``) that time
their parent's methods and write ``torch.cuda.max_memory_allocated`` and the process's VmHWM to
``<run_dir>/bench/*.json``; the code that runs is mop-ray's own. If the coordinator's names change, the
benchmark still runs and reports GPU memory from nvidia-smi only ("instrumented": false).

Compute floors (FLOPs that a phase cannot avoid; a multiply-add is 2 FLOPs; T calibration tokens in blocks of
L, S sampled tokens per MoE layer; parameters P are counted from the checkpoint's own tensor shapes):
  every decoder layer:   2·T·P_attn + causal attention 2·T·n_h·(d_qk + d_v)·(L+1)/2
      Mixtral:      P_attn = H·n_h·d + 2·H·n_kv·d + n_h·d·H,  d = d_qk = d_v = H/n_h   (GQA shares K/V, not FLOPs)
      DeepSeek-V3:  P_attn = H·q_lora + q_lora·n_h·(d_nope+d_rope) + H·(kv_lora+d_rope) + kv_lora·n_h·(d_nope+d_v)
                             + n_h·d_v·H,  d_qk = d_nope + d_rope = 192, d_v = 128   (MLA as transformers runs it)
  dense layer (DeepSeek-V3's first_k_dense_replace):  + 2·T·3·H·I_dense
  MoE layer, observe:    + 2·T·E·3·H·I_moe  (the observer runs every routed expert on every token)
                         + 2·T·E·H (router) + 2·T·3·H·I_shared (DeepSeek-V3 shared expert, I_shared = I_moe)
      The block's own top-k forward (2·T·k·3·H·I_moe) is not in the floor: its output could be assembled from
      the all-experts outputs. mop-ray runs it separately, so the ratio includes it ((E+k)/E = 1.25 for Mixtral).
      Mixtral-8x7B, per token and MoE layer: 2·(8·3·4096·14336 + 8·4096 + 41.9M) + 16.8M scores = 2.92 GFLOP.
      DeepSeek-V3, per token and MoE layer: 2·(256·3·7168·2048 + 3·7168·2048 + 256·7168 + 187.1M) + 84M scores
      = 23.1 GFLOP; per dense layer 2·(3·7168·18432 + 187.1M) + 84M = 1.25 GFLOP (L = 2048).
  select, methods that recompute experts (mop, gvp, enu, cprune: ``needs_weights``): per MoE layer every
      expert on the S sampled tokens 2·S·(E·3·H·I_moe + P_shared) + the products 2·S·(E + c²)·H, c = candidate
      experts per token (E under DeepSeek groups or E <= 32); 0 for layers of at most
      ``mop_ray.methods.products.RECORD_UP_TO`` experts (Mixtral), whose sampled rows carry the products the
      observer computed from its all-experts pass. Record-only methods (reap, frequency, ...): 0.
  calibrate (tokenisation) and write (byte copies) have no compute floor.
Read floors (bytes / measured read GB/s): observe: every decoder layer's tensors + the embedding (what the
  stages load); select: the records each task reads (sample + stats Parquet) + for ``needs_weights`` methods
  the MoE block's tensors, unless they selected inside the stages (manifest ``select.in``), which hold them; write: the output's bytes (each read once from the source).
Write floors (bytes / measured write GB/s): observe: the records it writes (sample.arrow + stats.parquet), which
  stream out while the micro-batches run; write: the output's bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for _k, _v in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
               ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

GB = 1e9


# ===================================================================================== floors: page cache, disk
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (mincore on a fresh mapping); None if unavailable."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    try:
        import numpy as np

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return float((np.frombuffer(vec, dtype=np.uint8) & 1).mean())
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def resident_share(paths: list[Path]) -> float | None:
    """The byte-weighted fraction of the files in the page cache; None where ``mincore`` is unavailable."""
    total = sum(p.stat().st_size for p in paths) or 1
    fr = [(resident_fraction(p), p.stat().st_size) for p in paths]
    return None if any(f is None for f, _ in fr) else sum(f * s for f, s in fr) / total


def drop_cache(paths: list[Path]) -> dict:
    """fsync + POSIX_FADV_DONTNEED per file; -> {"resident_before", "resident_after"} (byte-weighted fractions)."""
    before = resident_share(paths)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    after = resident_share(paths)
    return {"resident_before": before, "resident_after": after,
            "dropped": None if after is None else after < 0.05}


def read_files(paths: list[Path], threads: int, cap_bytes: int = 0, chunk: int = 64 << 20) -> int:
    """Read the files in ``chunk``-byte pieces with ``threads`` readers (each into its own reused buffer), up to
    ``cap_bytes`` of them (0: all); -> the bytes read."""
    from concurrent.futures import ThreadPoolExecutor

    jobs, planned = [], 0
    for p in paths:
        size = p.stat().st_size
        for off in range(0, size, chunk):
            if cap_bytes and planned >= cap_bytes:
                break
            n = min(chunk, size - off)
            jobs.append((p, off, n))
            planned += n
    local = threading.local()

    def read(job):
        p, off, n = job
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < chunk:
            buf = local.buf = bytearray(chunk)
        fd = os.open(p, os.O_RDONLY)
        try:
            return os.preadv(fd, [memoryview(buf)[:n]], off)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(read, jobs))


def warm_cache(paths: list[Path], threads: int = 4) -> dict:
    """Read every file whole into the page cache; -> {"resident_before", "resident_after"} (byte-weighted
    fractions, as ``drop_cache``), "warmed": whether at least 95 % is resident after."""
    before = resident_share(paths)
    read_files(paths, threads)
    after = resident_share(paths)
    return {"resident_before": before, "resident_after": after, "warmed": None if after is None else after >= 0.95}


def read_floor(paths: list[Path], cap_bytes: int, threads: int) -> dict:
    """Cold sequential read of (up to cap_bytes of) the files with ``threads`` readers; GB/s."""
    cache = drop_cache(paths)
    t0 = time.perf_counter()
    nbytes = read_files(paths, threads, cap_bytes)
    seconds = time.perf_counter() - t0
    return {"bytes": nbytes, "seconds": round(seconds, 3), "gb_per_s": round(nbytes / GB / max(seconds, 1e-9), 3),
            "threads": threads, "cache_dropped": cache["dropped"], "resident_before_drop": cache["resident_before"],
            "resident_after_drop": cache["resident_after"]}


def write_floor(directory: Path, nbytes: int, chunk: int = 64 << 20) -> dict:
    """fsync'ed sequential write of nbytes into directory; GB/s. The file is removed."""
    block = os.urandom(min(chunk, max(nbytes, 1)))
    path = directory / ".speed-write-probe"
    t0 = time.perf_counter()
    written = 0
    with open(path, "wb") as f:
        while written < nbytes:
            n = min(len(block), nbytes - written)
            f.write(memoryview(block)[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return {"bytes": written, "seconds": round(seconds, 3), "gb_per_s": round(written / GB / max(seconds, 1e-9), 3)}


# ===================================================================================== floors: compute (child process)
def matmul_probe(device: str, dtype: str, n: int, min_seconds: float) -> dict:
    import torch

    dt = getattr(torch, dtype)
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if iters >= 3 and iters % 3 == 0:
            sync()
            if time.perf_counter() - t0 >= min_seconds:
                break
    seconds = time.perf_counter() - t0
    return {"device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "dtype": dtype, "n": n, "iters": iters, "seconds": round(seconds, 3),
            "tflops": round(2 * n ** 3 * iters / seconds / 1e12, 3)}


def child(args: list[str], timeout: int = 1200) -> dict:
    """Run this file with ``args`` in a fresh interpreter and return the JSON it prints last."""
    res = subprocess.run([sys.executable, str(Path(__file__).resolve())] + args, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ===================================================================================== pollers
def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB from smaps_rollup (PSS splits shared pages such as libtorch and the object store)."""
    try:
        text = open(f"/proc/{pid}/smaps_rollup").read()
        rss = int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1))
        pss = int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))
        return rss, pss
    except (OSError, AttributeError):
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))
            return rss, rss
        except (OSError, AttributeError):
            return 0, 0


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class HostMemory(threading.Thread):
    """Polls the driver, its descendants (local Ray: gcs, raylet, workers) and any ``ray::`` process of this
    user; keeps the peak of the summed RSS and PSS per group (driver, Ray workers, Ray system) and in total."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.peak = {k: {"rss": 0, "pss": 0} for k in ("driver", "ray_workers", "ray_system", "total")}
        self.samples = 0
        self.at_peak: dict[str, int] = {}

    def sample(self) -> None:
        me, uid = os.getpid(), os.getuid()
        kids = _proc_children()
        tree, todo = set(), [me]
        while todo:
            p = todo.pop()
            if p not in tree:
                tree.add(p)
                todo += kids.get(p, [])
        for p in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            if p not in tree:
                try:
                    if os.stat(f"/proc/{p}").st_uid == uid and _cmdline(p).startswith("ray::"):
                        tree.add(p)
                except OSError:
                    pass
        now = {k: {"rss": 0, "pss": 0} for k in self.peak}
        by_title: dict[str, int] = {}  # RSS per process title (Ray sets ray::<task or actor method>, ray::IDLE)
        for p in tree:
            rss, pss = _mem_kb(p)
            title = _cmdline(p)
            group = "driver" if p == me else "ray_workers" if title.startswith("ray::") else "ray_system"
            for g in (group, "total"):
                now[g]["rss"] += rss * 1024
                now[g]["pss"] += pss * 1024
            key = "driver" if p == me else title.split()[0][:60] if title else "?"
            by_title[key] = by_title.get(key, 0) + rss * 1024
        if now["total"]["rss"] > self.peak["total"]["rss"]:  # who holds the memory at the peak
            self.at_peak = dict(sorted(by_title.items(), key=lambda kv: -kv[1])[:8])
        for g, v in now.items():
            for k in v:
                self.peak[g][k] = max(self.peak[g][k], v[k])
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        return {"peak_bytes": self.peak, "samples": self.samples, "interval_s": self.interval,
                "rss_at_peak_by_process": self.at_peak}


class GpuMemory(threading.Thread):
    """nvidia-smi memory.used per GPU (whole device: every process, CUDA contexts and allocator caches)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.peak_mib: dict[str, int] = {}
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.available and not self.stop_event.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    idx, used = (s.strip() for s in line.split(","))
                    self.peak_mib[idx] = max(self.peak_mib.get(idx, 0), int(float(used)))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self.stop_event.wait(self.interval)

    def stop(self) -> dict | None:
        self.stop_event.set()
        if self.is_alive():
            self.join()
        return {"peak_mib_per_gpu": self.peak_mib} if self.available else None


# ===================================================================================== instrumentation of the job
def _vm_hwm() -> int:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def _process_start_unix() -> float | None:
    """When this process started (Linux /proc), to tell a Ray worker's start and imports from its __init__."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _bench_write(run_dir, name: str, data: dict) -> None:
    d = Path(run_dir) / "bench"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps(data, indent=2))


def make_bench_shard(base):
    """A subclass of the coordinator's stage actor that times load/forward/finish and records peak memory."""

    class BenchShard(base):
        def __init__(self, *args, **kwargs):
            init_unix = time.time()
            super().__init__(*args, **kwargs)  # returns at once: the stage's loader thread reads and builds the layers
            self._bench = {"layers": list(self.layer_ids), "device": str(self.device), "init_unix": init_unix,
                           "process_start_unix": _process_start_unix(), "forward_s": 0.0, "forward_each_s": [],
                           "waves": 0, "micro_batches": 0, "first_wave_unix": None,
                           "built_unix": {}, "passed_unix": {}}  # layer -> on the device; -> the final wave passed it
            for i, built in zip(self.layer_ids, self._built):
                built.add_done_callback(lambda _, i=i: self._bench["built_unix"].__setitem__(i, time.time()))

        def _close_early(self, i):
            self._bench["passed_unix"][i] = time.time()  # the host has queued the final wave's work for layer i
            return super()._close_early(i)

        def forward_wave(self, mb_ids, *args, **kwargs):
            t0 = time.perf_counter()
            first = self._bench["first_wave_unix"] is None
            if first:
                self._bench["first_wave_unix"] = time.time()
                self.wave_events = []  # GPU time of each layer call in the first wave
            out = super().forward_wave(mb_ids, *args, **kwargs)  # returns once the device work is finished
            if first and self.wave_events:
                self._bench["first_wave_ms"] = _event_ms(self.wave_events)
            self.wave_events = None
            self._bench["forward_s"] += time.perf_counter() - t0
            self._bench["forward_each_s"].append(round(time.perf_counter() - t0, 4))
            self._bench["waves"] += 1
            self._bench["micro_batches"] += len(mb_ids)
            return out

        def finish(self, *args, **kwargs):
            import torch

            t0 = time.perf_counter()
            out = super().finish(*args, **kwargs)
            self._bench["finish_s"] = time.perf_counter() - t0
            cuda = self.device.type == "cuda"
            # the loader's clock: from __init__ to the last layer on the device (overlapping calibrate and the waves)
            self._bench["load_times"] = dict(self.load_times)
            self._bench["load_s"] = self.load_times.get("total_s")
            self._bench["weights_gpu_bytes"] = torch.cuda.memory_allocated() if cuda else None
            self._bench["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
            self._bench["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved() if cuda else None
            self._bench["vm_hwm_bytes"] = _vm_hwm()
            _bench_write(self.run_dir, f"stage-{self.layer_ids[0]:03d}.json", self._bench)
            return out

        def _select_one(self, ctx, *args, **kwargs):  # selection inside the stage, with the weights it holds
            parent = super()._select_one
            return _timed_select(self.run_dir, ctx.layer, {"in": "stage", "load_s": 0.0},
                                 lambda: parent(ctx, *args, **kwargs), shared=True)

    BenchShard.__name__ = BenchShard.__qualname__ = "BenchShard"
    return BenchShard


def _event_ms(events: list) -> dict[str, list[float]]:
    """{layer: [ms from the previous event to the one after each micro-batch's call]} from a stage's
    ``wave_events``: GPU time, plus any wait for the layer (its first entry) or for the host to launch work."""
    events[-1][2].synchronize()
    out: dict[str, list[float]] = {}
    for (_, _, before), (layer, _, after) in zip(events, events[1:]):
        out.setdefault(str(layer), []).append(round(before.elapsed_time(after), 2))
    return out


def _timed_select(run_dir, layer: int, info: dict, call, shared: bool = False):
    """``call()`` (one layer's selection) GPU-synchronised; writes ``select-NNN.json``: ``info`` plus the seconds,
    the peak GPU memory and the process's VmHWM. ``shared``: a stage's selection, maybe beside its waves on
    another stream: only the calling thread's stream is synchronised and the peak is the process's so far."""
    import torch

    cuda = torch.cuda.is_available()
    sync = (lambda: torch.cuda.current_stream().synchronize()) if shared else torch.cuda.synchronize
    if cuda:
        sync()
        if not shared:
            torch.cuda.reset_peak_memory_stats()
    info["start_unix"] = time.time()
    t0 = time.perf_counter()
    out = call()
    if cuda:
        sync()
    info.update({"layer": layer, "seconds": time.perf_counter() - t0, "vm_hwm_bytes": _vm_hwm(), "pid": os.getpid(),
                 "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None})
    _bench_write(run_dir, f"select-{layer:03d}.json", info)
    return out


def bench_select(*args, **kwargs):
    """The coordinator's select task body (``actors.tasks.select_layer``) timed, with its peak memory recorded."""
    from actors.tasks import select_layer

    run_dir, ctx = args[0], args[1]
    info = {"in": "task", "load_s": 0.0}
    orig = getattr(ctx, "moe_block", None)
    if orig is not None:  # time the layer load (the read part of selection) separately
        def timed_moe_block(*a, **k):
            t = time.perf_counter()
            res = orig(*a, **k)
            info["load_s"] += time.perf_counter() - t
            return res
        ctx.moe_block = timed_moe_block
    return _timed_select(run_dir, ctx.layer, info, lambda: select_layer(*args, **kwargs))


def instrument() -> bool:
    import ray

    import actors.coordinator as coord

    if not (hasattr(coord, "LayerShardWorker") and hasattr(coord, "select_layer_task")):
        return False
    coord.LayerShardWorker = make_bench_shard(coord.LayerShardWorker)
    coord.select_layer_task = ray.remote(max_retries=3)(bench_select)
    start_stages = coord.start_stages

    def timed_start_stages(*args, **kwargs):  # when the driver asks for the stages, to tell its own start from theirs
        STAGES_ASKED.append(time.time())
        live = start_stages(*args, **kwargs)
        STAGES_ASKED.append(time.time())  # the placement group reserved and every actor creation submitted
        return live
    coord.start_stages = timed_start_stages
    return True


STAGES_ASKED: list[float] = []  # unix times: the driver's start_stages called, and returned (pairs, per attempt)


# ===================================================================================== model costs (floors)
def model_costs(ckpt) -> dict:
    """Parameter counts and bytes per layer, by role, from the checkpoint's tensor shapes."""
    fam, cfg = ckpt.family, ckpt.config
    n_layers, moe = ckpt.num_layers, set(ckpt.moe_layers)
    layers = {i: {"attn": 0, "dense": 0, "experts": 0, "shared": 0, "router": 0, "bytes": 0, "moe_bytes": 0}
              for i in range(n_layers)}
    embed_bytes = 0
    for name, t in ckpt.tensors.items():
        i = ckpt.layer_of(name)
        if i is None:
            if "embed_tokens" in name:
                embed_bytes += t.nbytes
            continue
        if i >= n_layers:  # DeepSeek MTP layers: dropped by the writer, never run
            continue
        row = layers[i]
        row["bytes"] += t.nbytes
        local = name[len(fam.layer_prefix(i)):]
        in_moe = i in moe and local.startswith(fam.moe_module + ".")
        if in_moe:
            row["moe_bytes"] += t.nbytes
        if len(t.shape) != 2 or name.endswith("_scale_inv"):
            continue
        numel = t.shape[0] * t.shape[1]
        if fam.expert_re.match(name):
            row["experts"] += numel
        elif fam.router_re.match(name):
            row["router"] += numel
        elif any(f"{fam.moe_module}.{s}." in name for s in fam.shared_modules):
            row["shared"] += numel
        elif ".self_attn." in name:
            row["attn"] += numel
        else:
            row["dense"] += numel
    nh = int(cfg["num_attention_heads"])
    if cfg.get("qk_nope_head_dim") is not None:  # MLA (DeepSeek)
        d_qk = int(cfg["qk_nope_head_dim"]) + int(cfg["qk_rope_head_dim"])
        d_v = int(cfg.get("v_head_dim") or d_qk)
    else:
        d_qk = d_v = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // nh)
    return {"layers": layers, "embed_bytes": embed_bytes, "n_heads": nh, "d_qk": d_qk, "d_v": d_v,
            "hidden": int(cfg["hidden_size"]), "experts": ckpt.num_experts, "top_k": ckpt.top_k, "moe_layers": sorted(moe)}


def observe_flops(costs: dict, tokens: int, seq_len: int, layers=None) -> float:
    """The observe compute floor of ``layers`` (default: all) for ``tokens`` tokens in blocks of ``seq_len``."""
    per_token = 0.0
    scores = 2 * costs["n_heads"] * (costs["d_qk"] + costs["d_v"]) * (seq_len + 1) / 2
    for i, row in costs["layers"].items():
        if layers is not None and i not in layers:
            continue
        per_token += 2 * row["attn"] + scores + 2 * row["dense"]
        if i in costs["moe_layers"]:
            per_token += 2 * row["experts"] + 2 * row["router"] + 2 * row["shared"]  # all experts, every token
    return per_token * tokens


def select_flops(costs: dict, ckpt, method, sample_rows: dict[int, int], keep: int) -> float:
    if not method.needs_weights:
        return 0.0
    from mop_ray.methods.products import candidate_count
    from mop_ray.observe.records import records_products

    if records_products(costs["experts"]):  # the observer recorded the sample's products: no expert runs again
        return 0.0
    spec = ckpt.family.router_spec(ckpt.config)
    c = candidate_count(spec, costs["experts"], keep)
    total = 0.0
    for i in costs["moe_layers"]:
        s, row = sample_rows.get(i, 0), costs["layers"][i]
        total += 2 * s * (row["experts"] + row["shared"]) + 2 * s * (costs["experts"] + c * c) * costs["hidden"]
    return total


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file()) if path.exists() else 0


# ===================================================================================== enu comparison (child)
def enu_compare(model: str, run_dir: str, layer: int, keep: int, device: str) -> dict:
    import importlib.util

    import torch

    from mop_ray.arch.layer import build_layer
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.methods.enu import search
    from mop_ray.methods.products import expert_products
    from mop_ray.observe.records import read_sample

    spec_ = importlib.util.spec_from_file_location("enu_speed", REPO / "benchmarks" / "enu_speed.py")
    enu_speed = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(enu_speed)

    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # as enu_speed.py
    ckpt = Checkpoint(model)
    spec = ckpt.family.router_spec(ckpt.config)
    moe = build_layer(ckpt, layer, device=dev, dtype=dt).mlp
    n = ckpt.num_experts
    sample = read_sample(run_dir, layer)
    x = sample.tensor("x", dev, dt)
    tokens = x.shape[0]
    logits = torch.nn.functional.linear(x.float(), moe.gate.weight.float())
    z = enu_speed.moe_output(moe, spec, x, logits)
    batch = torch.arange(tokens, device=dev) * 16 // tokens  # 16 NAEE batches

    def floor():
        with torch.no_grad():
            for s in range(0, tokens, 32768):
                for e in range(n):
                    enu_speed.expert_forward(moe.experts, x[s:s + 32768], e)

    def fast():
        prods = expert_products(moe, ckpt.family, spec, x, z, logits, min_kept=keep)
        return search(prods, batch, n, keep)

    timed = enu_speed.timed
    t_floor, _ = timed(floor, 3)
    t_fast, (kept_fast, details) = timed(fast, 2)
    t_masked, (kept_masked, loss_masked) = timed(lambda: enu_speed.masked_enumeration(moe, spec, x, z, logits, batch, keep))
    return {"layer": layer, "tokens": tokens, "inputs": "the layer's recorded calibration sample", "experts": n,
            "keep": keep, "sets": details["sets_scored"], "dtype": str(dt).replace("torch.", ""),
            "floor_s": round(t_floor, 4), "fast_s": round(t_fast, 4), "masked_s": round(t_masked, 4),
            "fast_over_floor": round(t_fast / t_floor, 3), "masked_over_fast": round(t_masked / t_fast, 2),
            "same_choice": kept_fast == kept_masked, "kept": kept_fast, "loss_fast": details["loss"],
            "loss_masked": loss_masked,
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / GB, 2) if dev.type == "cuda" else None}


# ===================================================================================== the benchmark
def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "bytecode_cache": sys.pycache_prefix}
    for pkg in ("torch", "transformers", "ray", "safetensors", "mop-ray"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        try:
            env["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def run_dir_of(args, work: Path, stages: int) -> Path:
    """The job's run dir (records, hidden states between rounds) for a run with ``stages`` stages."""
    return Path(args.run_root or work) / f"run-s{stages}"


def prune_job(args, ckpt, work: Path, stages: int):
    """The job a run with ``stages`` stages times: output ``work/pruned-s<stages>``, run dir ``run_dir_of``."""
    from actors.coordinator import PruneJob

    return PruneJob(model=str(ckpt.path), out=str(work / f"pruned-s{stages}"), method=args.method, keep=args.keep,
                    general=args.general, calib=args.calib, tokens=args.tokens, seq_len=args.seq_len,
                    sample=args.sample, seed=args.seed, run_dir=str(run_dir_of(args, work, stages)), stages=stages,
                    stages_at_once=args.stages_at_once, micro_batch=args.micro_batch, waves=args.waves,
                    max_shard_size=args.max_shard_size, dtype=args.dtype, overwrite=True, progress=args.progress,
                    select_early=not args.select_after_observe, write_early=not args.write_after_select)


def one_run(args, ckpt, costs, shards, stages: int, floors: dict, work: Path, log) -> dict:
    import ray

    from actors.coordinator import run
    from mop_ray.methods import get_method
    from mop_ray.observe.records import layer_dir

    method = get_method(args.method)
    job = prune_job(args, ckpt, work, stages)
    out, run_dir = Path(job.out), Path(job.run_dir)
    for p in (out, run_dir):
        shutil.rmtree(p, ignore_errors=True)
    if args.page_cache == "warm":  # the stages read from memory: what the pipeline does when reads do not bind
        cache = {**warm_cache(shards), "page_cache": "warm"}
        log(f"run with {stages} stage(s): the shards read into the page cache first: {cache['warmed']} "
            f"(resident {fmt(cache['resident_before'], 3)} -> {fmt(cache['resident_after'], 3)})")
    else:
        cache = {**drop_cache(shards), "page_cache": "cold"}
        log(f"run with {stages} stage(s): page cache of the shards dropped: {cache['dropped']} "
            f"(resident {fmt(cache['resident_before'], 3)} -> {fmt(cache['resident_after'], 3)})")
    host, gpu = HostMemory(args.poll), GpuMemory(args.poll)
    host.start()
    gpu.start()
    STAGES_ASKED.clear()
    t0, start_unix = time.perf_counter(), time.time()
    try:
        res = run(job, log=log)
    finally:
        wall = time.perf_counter() - t0
        host_peak, gpu_peak = host.stop(), gpu.stop()
    pruning = json.loads((out / "pruning.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    timings = {**res.get("timings", {}), **{k: v for k, v in pruning.get("timings", {}).items() if k.endswith("_s")}}
    bench = {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "bench").glob("*.json"))}
    obs = manifest["phases"].get("observe") or {}
    sample_rows = {int(k): int(v.get("rows", 0)) for k, v in (obs.get("layers") or {}).items()}
    tokens = int(obs.get("tokens") or 0)

    # floors per phase
    tflops, read_bw, write_bw = floors["matmul"]["tflops"] or 0, floors["read"]["gb_per_s"], floors["write"]["gb_per_s"]
    observe_read = sum(r["bytes"] for r in costs["layers"].values()) + costs["embed_bytes"]
    records = run_dir / "records"
    records_bytes = dir_bytes(records, "sample.arrow") + dir_bytes(records, "stats.parquet")
    select_read = (dir_bytes(records, "sample.arrow") if method.needs_records else 0) + dir_bytes(records, "stats.parquet")
    in_stages = (manifest["phases"].get("select") or {}).get("in") == "stages"  # the stages' weights, not re-read
    if method.needs_weights and not in_stages:
        select_read += sum(costs["layers"][i]["moe_bytes"] for i in costs["moe_layers"])
    out_bytes = int(pruning.get("bytes_after") or dir_bytes(out, "*.safetensors"))
    phases = []

    def phase(name, seconds, flops=0.0, read=0, written=0):
        if seconds is None:
            return
        f_compute = flops / (tflops * 1e12) if flops and tflops else None  # None: the phase has no such floor
        f_read = read / (read_bw * GB) if read else None
        f_write = written / (write_bw * GB) if written else None
        floor = max(f or 0.0 for f in (f_compute, f_read, f_write))
        rnd = lambda f: None if f is None else round(f, 4)  # noqa: E731
        phases.append({"phase": name, "seconds": seconds, "flops": flops, "read_bytes": read, "write_bytes": written,
                       "compute_floor_s": rnd(f_compute), "read_floor_s": rnd(f_read), "write_floor_s": rnd(f_write),
                       "floor_s": round(floor, 4), "time_over_floor": round(seconds / floor, 2) if floor > 0 else None})

    stage_info = [v for k, v in bench.items() if k.startswith("stage-")]
    select_info = [v for k, v in bench.items() if k.startswith("select-")]
    phase("calibrate", timings.get("calibrate_s"))
    if "observe_s" in timings:
        # the records' bytes (sample + statistics) are written while the micro-batches stream: a floor of their own
        phase("observe", timings["observe_s"], observe_flops(costs, tokens, args.seq_len), observe_read, records_bytes)
    if stage_info:  # the slowest stage's weight load and its forward time (stages work concurrently)
        def stage_bytes(st):
            return sum(costs["layers"][i]["bytes"] for i in st["layers"]) + (costs["embed_bytes"] if 0 in st["layers"] else 0)
        st = max(stage_info, key=lambda v: v["load_s"])
        phase(f"  stage start + weight load, overlapping calibrate and the waves (slowest of {len(stage_info)})",
              round(st["load_s"], 2), read=stage_bytes(st))
        st = max(stage_info, key=lambda v: v["forward_s"])
        stage_records = sum(dir_bytes(layer_dir(run_dir, i), "sample.arrow") for i in st["layers"] if i in costs["moe_layers"])
        phase(f"  observe: forward waves incl. waiting for layers (slowest stage, {st['waves']} waves, "
              f"{st['micro_batches']} micro-batches)", round(st["forward_s"], 2),
              observe_flops(costs, tokens, args.seq_len, set(st["layers"])), written=stage_records)
    phase("select", timings.get("select_s"), select_flops(costs, ckpt, method, sample_rows, args.keep), select_read)
    if select_info and method.needs_weights and not in_stages:
        phase(f"  select: layer loads in the {len(select_info)} tasks (sum)", round(sum(v["load_s"] for v in select_info), 2),
              read=sum(costs["layers"][i]["moe_bytes"] for i in costs["moe_layers"]))
    phase("write", timings.get("write_s"), 0.0, out_bytes, out_bytes)
    top = [p for p in phases if not p["phase"].startswith(" ")]
    accounted = sum(p["seconds"] for p in top)
    floor_sum = sum(p["floor_s"] for p in top)
    phases.append({"phase": "verify + driver overhead", "seconds": round(wall - accounted, 2)})
    # the stricter whole-job floor: the largest of all compute, all reads and all writes (phases may overlap)
    sums = {k: sum(p[k] or 0.0 for p in top) for k in ("compute_floor_s", "read_floor_s", "write_floor_s")}
    floor_max = max(sums.values())
    # issue 7's literal floor: max(all compute, one read of what the stages load: every layer and the embedding)
    floor_issue = max(sums["compute_floor_s"], observe_read / (read_bw * GB) if read_bw else 0.0)
    phases.append({"phase": "total", "seconds": round(wall, 2), "floor_s": round(floor_sum, 4),
                   "time_over_floor": round(wall / floor_sum, 2) if floor_sum > 0 else None,
                   "floor_max_s": round(floor_max, 4),
                   "time_over_floor_max": round(wall / floor_max, 2) if floor_max > 0 else None,
                   "floor_compute_or_read_s": round(floor_issue, 4),
                   "time_over_floor_compute_or_read": round(wall / floor_issue, 2) if floor_issue > 0 else None})

    cuda_peaks = [v["cuda_peak_bytes"] for v in stage_info + select_info if v.get("cuda_peak_bytes")]
    result = {
        "stages": stages, "wall_s": round(wall, 2), "timings": timings, "phases": phases, "run_start_unix": start_unix,
        "stages_asked_unix": list(STAGES_ASKED),
        "calibrate": manifest["phases"].get("calibrate"),  # tokenising vs imports and tokenizer load
        "tokens": tokens, "observe_tokens_per_s": round(tokens / timings["observe_s"], 1) if timings.get("observe_s") else None,
        "stream_tokens_per_s": (round(tokens / max(v["forward_s"] for v in stage_info), 1)
                                if stage_info and tokens else None),
        "sample_rows": sample_rows, "output_bytes": out_bytes, "source_bytes": ckpt.total_bytes,
        "cache_before_run": cache, "gpu_peak_torch_bytes": max(cuda_peaks) if cuda_peaks else None,
        "gpu_nvidia_smi": gpu_peak, "host_memory": host_peak, "stage_actors": stage_info, "select_tasks": select_info,
        "placement": obs.get("placement"), "keep_map": {str(k): v for k, v in res.get("keep_map", {}).items()},
        "write": manifest["phases"].get("write"),  # shards written ahead, with their writes' start and end (unix)
        "resources": ray.cluster_resources(),
    }
    return result


def critical_path(run: dict) -> dict | None:
    """Where one run's wall time went along its critical path, in seconds from the run's start: until the first stage's
    first layer is built, from there until the last layer has passed its final wave, and after that; None without
    the stages' timestamps (a method with no calibration)."""
    stages = [st for st in run.get("stage_actors", []) if st.get("built_unix") and st.get("passed_unix")]
    if not stages or "run_start_unix" not in run:
        return None
    t0 = run["run_start_unix"]
    first = stages[0]["built_unix"][str(stages[0]["layers"][0])] - t0
    last_passed = max(max(st["passed_unix"].values()) for st in stages) - t0
    observe = [p for p in run["phases"] if p["phase"] == "observe"]
    asked = run.get("stages_asked_unix") or []
    return {"start_s": first, "waves_s": last_passed - first, "tail_s": run["wall_s"] - last_passed,
            "asked_s": asked[0] - t0 if asked else None, "init_s": stages[0]["init_unix"] - t0,
            "last_built_s": max(max(st["built_unix"].values()) for st in stages) - t0,
            "compute_floor_s": observe[0].get("compute_floor_s") if observe else None}


def markdown(report: dict) -> str:
    m, fl = report["model"], report["floors"]
    lines = [f"## mop-ray speed: {m['family']} ({m['layers']} layers: {len(m['moe_layers'])} MoE, "
             f"{m['experts']} experts top-{m['top_k']}; {m['bytes'] / GB:.2f} GB) on {report['device_name']}",
             "",
             f"Job: `{report['job']['method']}` keep {report['job']['keep']}, " + (
                 f"{report['job']['tokens']:,} calibration tokens (blocks of {report['job']['seq_len']}), sample "
                 f"{report['job']['sample']:,}, micro-batch {report['job']['micro_batch']}." if report["calibrated"]
                 else "no calibration (the method needs no records)."),
             "Floors: " + (f"matmul {fl['matmul']['dtype']} {fl['matmul']['n']}^3 **{fl['matmul']['tflops']:.2f} TFLOP/s**; "
                           if fl["matmul"].get("tflops") else "no matmul floor needed; ") +
             f"disk read **{fl['read']['gb_per_s']:.3f} GB/s** over {fl['read']['bytes'] / GB:.2f} GB with "
             f"{fl['read']['threads']} threads (page cache dropped: {fl['read']['cache_dropped']}, resident before the "
             f"read {fmt(fl['read']['resident_after_drop'], 3)}); disk write **{fl['write']['gb_per_s']:.3f} GB/s** "
             f"(fsync'ed, {fl['write']['bytes'] / GB:.2f} GB).", ""]
    if any((r.get("cache_before_run") or {}).get("page_cache") == "warm" for r in report["runs"]):
        lines[-1:-1] = ["Page cache: **warm** — the shards were read into it before each run (`--page-cache warm`), so "
                        "the stages read memory, not the disk: the read floors below do not bind these runs.", ""]
    lines += ["| stages | phase | time (s) | compute floor (s) | read floor (s) | write floor (s) | time / floor |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        for p in r["phases"]:
            lines.append(f"| {r['stages']} | {p['phase']} | {fmt(float(p['seconds']))} | {fmt(p.get('compute_floor_s'), 3)} | "
                         f"{fmt(p.get('read_floor_s'), 3)} | {fmt(p.get('write_floor_s'), 3)} | "
                         f"{fmt(p.get('time_over_floor'))}{'x' if p.get('time_over_floor') else ''} |")
    for r in report["runs"]:
        t = r["phases"][-1]
        if t.get("time_over_floor") is not None:
            lines += ["", f"Whole job ({r['stages']} stage(s)): {t['seconds']:.2f} s = {t['time_over_floor']:.2f}x the sum "
                          f"of the phase floors, {fmt(t.get('time_over_floor_max'))}x the max over resources (all "
                          f"compute, all reads, all writes), {fmt(t.get('time_over_floor_compute_or_read'))}x max(all "
                          f"compute, one read of the layers) = {fmt(t.get('floor_compute_or_read_s'))} s."]
    for r in report["runs"]:
        path = critical_path(r)
        if path:
            lines += ["", f"Critical path ({r['stages']} stage(s)): {path['start_s']:.2f} s before the first layer is built "
                          f"(stages asked for at {fmt(path['asked_s'])} s, the first one's __init__ at {path['init_s']:.2f} s, then its "
                          f"imports and its read), {path['waves_s']:.2f} s from there until the last layer "
                          f"has passed (compute floor {fmt(path['compute_floor_s'])} s; the last layer built at "
                          f"{path['last_built_s']:.2f} s), {path['tail_s']:.2f} s after it (the last selections and "
                          f"shards)."]
    lines += ["", "| stages | observe tokens/s | streaming tokens/s | GPU peak, torch (GB) | GPU peak, nvidia-smi (GB) | "
                  "host peak RSS / PSS, all processes (GB) | driver peak RSS (GB) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        smi = r["gpu_nvidia_smi"]["peak_mib_per_gpu"] if r.get("gpu_nvidia_smi") else None
        smi_text = " / ".join(f"{v * 2**20 / GB:.1f}" for _, v in sorted(smi.items())) if smi else "-"
        hp = r["host_memory"]["peak_bytes"]
        lines.append(f"| {r['stages']} | {fmt(r['observe_tokens_per_s'], 0)} | {fmt(r['stream_tokens_per_s'], 0)} | "
                     f"{fmt(r['gpu_peak_torch_bytes'] / GB if r['gpu_peak_torch_bytes'] else None)} | {smi_text} | "
                     f"{hp['total']['rss'] / GB:.2f} / {hp['total']['pss'] / GB:.2f} | {hp['driver']['rss'] / GB:.2f} |")
    for r in report["runs"]:  # where each stage's first wave spent its GPU time (CUDA events; GPU runs only)
        for st in r.get("stage_actors", []):
            if st.get("first_wave_ms"):
                parts = [f"layer {layer}: first {ms[0]:.0f} ms, then median {statistics.median(ms[1:] or ms):.0f} ms"
                         for layer, ms in st["first_wave_ms"].items()]
                lines += ["", f"First wave of the stage holding layers {st['layers'][0]}-{st['layers'][-1]} "
                              f"({r['stages']} stage(s)), per micro-batch call: " + "; ".join(parts) + "."]
    for r in report["runs"]:  # stages that streamed their layers (one wave, more layers than their device holds)
        for p in r.get("placement") or []:
            load = p.get("load") or {}
            if load.get("stream_budget_gb"):
                lines += ["", f"The stage holding layers {p['layers'][0]}-{p['layers'][-1]} ({r['stages']} stage(s)) "
                              f"streamed them: at most {load['stream_budget_gb']:.1f} GB of layers at once, "
                              f"{load['held_peak_gb']:.1f} GB at the peak, {load['room_wait_s']:.1f} s of its loader "
                              "waiting for room."]
    if report.get("enu_compare"):
        e = report["enu_compare"]
        if "skipped" in e:
            lines += ["", f"Enu comparison skipped: {e['skipped']}"]
        else:
            lines += ["", f"Enu on layer {e['layer']} ({e['tokens']:,} recorded tokens, {e['experts']} -> {e['keep']}, "
                          f"{e['sets']} sets, {e['dtype']}): all experts once {e['floor_s']:.3f} s, mop-ray scorer "
                          f"{e['fast_s']:.3f} s ({e['fast_over_floor']:.2f}x the floor), masked forward per set "
                          f"{e['masked_s']:.3f} s ({e['masked_over_fast']:.1f}x the scorer); same set: {e['same_choice']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_matmul-probe"]:
        print(json.dumps(matmul_probe(argv[1], argv[2], int(argv[3]), float(argv[4]))))
        return 0
    if argv[:1] == ["--_enu-compare"]:
        print(json.dumps(enu_compare(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5])))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. from benchmarks/make_synthetic.py)")
    ap.add_argument("--method", default="mop")
    ap.add_argument("--keep", type=int, required=True)
    ap.add_argument("--general", type=int)
    ap.add_argument("--calib", default="default")
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sample", type=int, default=65536)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--waves", type=int, help="the job's --waves (default: the coordinator's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", help="compute dtype of the stages (default: the checkpoint's)")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1],
                    help="run the job once per value with that many pipeline stages (one per GPU; on CPU, CPU stages)")
    ap.add_argument("--stages-at-once", type=int,
                    help="the job's --stages-at-once: fewer than --gpus' stages run in rounds (default: the job's)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--address", help="an existing Ray cluster (default: a local Ray, loopback only)")
    ap.add_argument("--work", help="where pruned outputs and run dirs go (default: <model>.speed)")
    ap.add_argument("--run-root", help="where the run dirs (records) go, when not in --work: e.g. a RAM disk "
                    "beside an output on the disk")
    ap.add_argument("--out-json")
    ap.add_argument("--enu-compare", action="store_true")
    ap.add_argument("--select-after-observe", action="store_true",
                    help="stages select every layer after observe (PruneJob.select_early=False), not beside it")
    ap.add_argument("--write-after-select", action="store_true",
                    help="write every output shard after the select phase (PruneJob.write_early=False), not each "
                         "as soon as its layers are selected")
    ap.add_argument("--matmul-size", type=int, help="n of the n x n x n floor matmul (default 8192 on GPU, 1024 on CPU)")
    ap.add_argument("--read-floor-gb", type=float, default=8.0, help="read at most this much for the read floor (0: all)")
    ap.add_argument("--read-threads", type=int, default=4)
    ap.add_argument("--write-floor-gb", type=float, default=2.0, help="bytes written by the write-floor probe "
                                                                      "(capped at the checkpoint's size)")
    ap.add_argument("--page-cache", choices=("cold", "warm"), default="cold",
                    help="before each run, drop the shards from the page cache (cold: the stages read the disk) or "
                         "read them all into it (warm: the pipeline's scaling where one disk would bind several "
                         "GPUs; the read floor is then not what binds)")
    ap.add_argument("--keep-output", action="store_true", help="keep the pruned checkpoints and run dirs")
    ap.add_argument("--progress", action="store_true", help="tqdm bars of the coordinator")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between memory samples")
    args = ap.parse_args(argv)
    from mop_ray.bytecode import use_bytecode_cache

    use_bytecode_cache()  # as the CLI's connect() does, before torch's and transformers' imports (MOP_RAY_PYCACHE=0: off)

    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.errors import MopError
    from mop_ray.methods import get_method
    from actors.disk_space import check_disk_space

    t_log = time.perf_counter()

    def log(*a):  # seconds since start first, so a slow step between two lines shows
        print(f"[{time.perf_counter() - t_log:7.2f}]", *a, file=sys.stderr, flush=True)

    try:
        ckpt = Checkpoint(args.model)
        method = get_method(args.method)
    except MopError as e:
        print(f"speed: error: {e}", file=sys.stderr)
        return 2
    shards = sorted({t.path for t in ckpt.tensors.values()})
    costs = model_costs(ckpt)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    rounds = bool(args.stages_at_once) and args.stages_at_once <= max(n_gpus, 1)  # more stages than GPUs: rounds
    bad = [g for g in args.gpus if g < 1 or g > ckpt.num_layers
           or (device == "cuda" and not args.address and not rounds and g > n_gpus)]
    if bad:
        print(f"speed: error: --gpus {bad}: each count must be 1..{ckpt.num_layers} (layers)"
              + (f" and at most the {n_gpus} visible GPU(s) (more stages run in rounds with --stages-at-once)"
                 if device == "cuda" else ""), file=sys.stderr)
        return 2
    if method.needs_weights:  # the set scorer's Gram budget (mop_ray.methods.products): refuse now, not after observe
        from mop_ray.methods.products import candidate_count

        c = candidate_count(ckpt.family.router_spec(ckpt.config), ckpt.num_experts, math.ceil(args.keep / 2))
        if min(args.sample, args.tokens) * c * c * 8 > (8 << 30):
            print(f"speed: error: --sample {args.sample}: {args.method}'s expert Gram needs {args.sample} x {c}^2 x 8 B "
                  f"> 8 GiB; use --sample {(8 << 30) // (c * c * 8)} or less", file=sys.stderr)
            return 2
    work = Path(args.work) if args.work else Path(str(ckpt.path.absolute()) + ".speed")
    work.mkdir(parents=True, exist_ok=True)
    # upfront, before the floors: the job's own disk check (records, output, hidden states between rounds) for the
    # largest stage count
    stages = max(args.gpus)
    try:
        check_disk_space(prune_job(args, ckpt, work, stages), ckpt,
                         rounds=-(-stages // args.stages_at_once) if args.stages_at_once else 1)
    except MopError as e:
        print(f"speed: error: {e}", file=sys.stderr)
        return 2

    # (a) floors
    mm_dtype = args.dtype or str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "bfloat16")
    # CPUs without bf16 units run bf16 matmuls ~20x slower than float32: a smaller probe there
    mm_n = args.matmul_size or (8192 if device == "cuda" else 1024 if mm_dtype == "float32" else 512)
    if method.needs_records or method.needs_weights:
        log(f"floors: matmul {mm_dtype} {mm_n}^3 on {device} ...")
        matmul = child(["--_matmul-probe", device, mm_dtype, str(mm_n), "2.0" if device == "cuda" else "1.0"])
        log(f"  {matmul['tflops']:.3f} TFLOP/s on {matmul['device']}")
    else:  # nothing of this method has a compute floor
        matmul = {"skipped": f"{args.method} computes nothing", "tflops": None, "device": device, "dtype": mm_dtype,
                  "n": 0}
    read = read_floor(shards, int(args.read_floor_gb * GB), args.read_threads)
    log(f"  disk read {read['gb_per_s']:.3f} GB/s over {read['bytes'] / GB:.2f} GB (cache dropped: {read['cache_dropped']})")
    write = write_floor(work, int(min(args.write_floor_gb * GB, max(ckpt.total_bytes, 64 << 20))))
    log(f"  disk write {write['gb_per_s']:.3f} GB/s over {write['bytes'] / GB:.2f} GB (fsync)")
    floors = {"matmul": matmul, "read": read, "write": write}

    # (b) the job, once per stage count
    import ray

    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True, **({"num_gpus": 0} if device == "cpu" else {}))
    instrumented = instrument()
    if not instrumented:
        log("speed: the coordinator has no LayerShardWorker/select_layer_task to wrap; GPU memory from nvidia-smi only")
    env = environment()
    device_name = (env.get("gpus") or ["cuda"])[0].split(",")[0] if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {"environment": env, "device": device, "device_name": device_name, "instrumented": instrumented,
              "calibrated": method.needs_records,
              "model": {"path": str(ckpt.path), "family": ckpt.family.name, "layers": ckpt.num_layers,
                        "moe_layers": ckpt.moe_layers, "experts": ckpt.num_experts, "top_k": ckpt.top_k,
                        "bytes": ckpt.total_bytes, "fp8": bool((ckpt.config.get("quantization_config") or {})),
                        "synthetic": json.loads((ckpt.path / "synthetic.json").read_text())
                        if (ckpt.path / "synthetic.json").exists() else None},
              "job": {k: getattr(args, k) for k in ("method", "keep", "general", "calib", "tokens", "seq_len", "sample",
                                                     "micro_batch", "dtype", "seed")},
              "floors": floors, "runs": []}
    try:
        for i, stages in enumerate(args.gpus):
            r = one_run(args, ckpt, costs, shards, stages, floors, work, log)
            report["runs"].append(r)
            if i == 0 and args.enu_compare:
                report["enu_compare"] = run_enu_compare(args, ckpt, run_dir_of(args, work, stages), device, log)
            if not args.keep_output:
                shutil.rmtree(work / f"pruned-s{stages}", ignore_errors=True)
                shutil.rmtree(run_dir_of(args, work, stages), ignore_errors=True)
    except MopError as e:
        print(f"speed: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.out_json and report["runs"]:
            Path(args.out_json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if not args.keep_output and not any(work.iterdir()):
            work.rmdir()
    print(markdown(report))
    if args.out_json:
        log(f"wrote {args.out_json}")
    return 0


def run_enu_compare(args, ckpt, run_dir: Path, device: str, log) -> dict:
    spec = ckpt.family.router_spec(ckpt.config)
    if spec.scoring != "softmax" or (spec.group_score is not None and spec.n_group > 1):
        return {"skipped": f"{ckpt.family.name}: enu_speed.py's masked forward models ungrouped softmax routers only"}
    if math.comb(ckpt.num_experts, args.keep) > 5000:
        return {"skipped": f"C({ckpt.num_experts}, {args.keep}) sets is too many for a masked forward per set"}
    layer = ckpt.moe_layers[0]
    log(f"enu comparison on layer {layer} ...")
    try:
        return child(["--_enu-compare", str(ckpt.path), str(run_dir), str(layer), str(args.keep), device])
    except (RuntimeError, subprocess.SubprocessError) as e:
        return {"skipped": f"failed: {e}"}


if __name__ == "__main__":
    sys.exit(main())

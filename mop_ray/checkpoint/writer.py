"""Write the pruned checkpoint: streamed shards, index, patched config, copied tokenizer files, pruning.json.

Everything is planned from source headers before a byte is written (``plan_output``: ``plan_tensors`` → ``plan_shards``),
so each output shard is a pure function of (source, keep-map) and can be written by any worker
(``write_one_shard``), in any order, and retried. ``publish`` writes into a temporary sibling directory
and renames it into place only when complete, so ``--out`` never holds a partial checkpoint.

DeepSeek MTP layers (``model.layers.{num_hidden_layers}+``) are dropped and ``num_nextn_predict_layers`` is
set to 0: transformers ignores them, pruning them would need calibration through the MTP block, and a
keep rule borrowed from another layer would silently break speculative decoding. vLLM then serves the model
without MTP speculative decoding.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from mop_ray.checkpoint.keepmap import normalise_keep_map
from mop_ray.checkpoint.nonuniform import mark_config
from mop_ray.checkpoint.reader import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint
from mop_ray.checkpoint.safetensors_io import OutTensor, TensorInfo, write_shard
from mop_ray.errors import MopError

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
# the last TAIL_LAYERS MoE layers' shards are written when the job's waves are over (``ShardsAhead``: the last
# layer's after its selection, the one before after a selection that ran beside the last layer's waves; a writer
# hashes ~1.5 GB/s): each of these layers goes into up to TAIL_SHARDS shards of at least TAIL_MIN_BYTES, written
# side by side
TAIL_LAYERS = 2
TAIL_SHARDS = 4
TAIL_MIN_BYTES = 256 * 10**6
NOT_COPIED = {"config.json", INDEX_NAME, "pruning.json"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf") + PICKLE_SUFFIXES


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512*2**20, 1000 -> 1000 (the units of transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MopError(f"--max-shard-size: expected a size like 5GB or 500MiB, found {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as ``parse_size`` reads them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _rows(t: TensorInfo, rows: list[int]) -> list[tuple[Path, int, int]]:
    """Byte ranges of ``t[rows]``, adjacent rows merged into one range."""
    pieces: list[tuple[Path, int, int]] = []
    for row in rows:
        start, n = t.row_range(row)
        if pieces and pieces[-1][1] + pieces[-1][2] == start:
            pieces[-1] = (t.path, pieces[-1][1], pieces[-1][2] + n)
        else:
            pieces.append((t.path, start, n))
    return pieces


def _order_key(ckpt: Checkpoint, name: str) -> tuple:
    """Embedding, then the other tensors outside layers (final norm, LM head), then the layers in order."""
    layer = ckpt.layer_of(name)
    if layer is not None:
        return (2, layer, name)
    return (0 if "embed" in name else 1, 0, name)


def plan_tensors(ckpt: Checkpoint, keep: dict[int, list[int]], names: list[str] | None = None) -> list[OutTensor]:
    """Every output tensor (from the source tensors ``names`` when given) with its final name and the source byte
    ranges it is copied from, ordered by final name: so with r experts kept in every layer, names, shapes and
    their order, hence the shards, are the same whichever experts are kept (``ShardsAhead`` relies on it)."""
    fam = ckpt.family
    drop_layers = set(ckpt.mtp_layers)
    out: list[OutTensor] = []
    for name in ckpt.tensors if names is None else names:
        t = ckpt.tensors[name]
        layer = ckpt.layer_of(name)
        if layer in drop_layers:
            continue
        if m := fam.expert_re.match(name):
            kept = keep[int(m.group(1))]
            e = int(m.group(2))
            if e in kept:
                new = f"model.layers.{m.group(1)}.{fam.moe_module}.experts.{kept.index(e)}.{m.group(3)}"
                out.append(OutTensor(new, t.dtype, t.shape, [(t.path, t.start, t.nbytes)]))
        elif fam.router_re.match(name) or fam.fused_expert_re.match(name):
            kept = keep[layer]
            if t.shape[0] != ckpt.num_experts:
                raise MopError(f"{t.path}: {name} has {t.shape[0]} rows, expected one per expert ({ckpt.num_experts})")
            out.append(OutTensor(name, t.dtype, (len(kept),) + t.shape[1:], _rows(t, kept)))
        else:
            out.append(OutTensor(name, t.dtype, t.shape, [(t.path, t.start, t.nbytes)]))
    return sorted(out, key=lambda t: _order_key(ckpt, t.name))


def plan_output(ckpt: Checkpoint, keep: dict[int, list[int]], max_shard_bytes: int) -> list[list[OutTensor]]:
    """The output's shards: ``plan_tensors`` packed by ``plan_shards``; when it takes more than one shard, every
    decoder layer starts a shard of its own (the embedding, final norm and LM head come first, together), so a
    shard holds one layer at most and ``ShardsAhead`` can write each layer as soon as it is chosen — only the last
    MoE layers' shards are left for the end, so each of the last ``TAIL_LAYERS`` is spread over up to
    ``TAIL_SHARDS`` shards, written side by side (``_tail_cuts``)."""
    tensors = plan_tensors(ckpt, keep)
    if sum(t.nbytes for t in tensors) <= max_shard_bytes:
        return plan_shards(tensors, max_shard_bytes)
    by_layer: dict[int, list[OutTensor]] = defaultdict(list)  # decoder layer -> its tensors, in output order
    for t in tensors:
        if (layer := ckpt.layer_of(t.name)) is not None:
            by_layer[layer].append(t)
    firsts = {own[0].name for own in by_layer.values()}
    return plan_shards(tensors, max_shard_bytes, firsts | _tail_cuts(ckpt, by_layer))


def _tail_cuts(ckpt: Checkpoint, by_layer: dict[int, list[OutTensor]]) -> set[str]:
    """The tensors that start the 2nd, 3rd, ... shard of each of the last ``TAIL_LAYERS`` MoE layers: a layer's
    bytes in up to ``TAIL_SHARDS`` parts of about equal size and at least ``TAIL_MIN_BYTES`` each, cut between
    tensors (none for a small layer)."""
    cuts = set()
    for layer in sorted(set(by_layer) & set(ckpt.moe_layers))[-TAIL_LAYERS:]:
        own = by_layer[layer]
        total = sum(t.nbytes for t in own)
        parts = max(1, min(TAIL_SHARDS, total // TAIL_MIN_BYTES))
        size, nth = 0, 1
        for t in own:
            if nth < parts and size >= nth * total / parts:
                cuts.add(t.name)
                nth += 1
            size += t.nbytes
    return cuts


def plan_shards(tensors: list, max_shard_bytes: int, break_at: set[str] = frozenset()) -> list[list]:
    """Consecutive tensors packed into shards of at most max_shard_bytes (a bigger tensor gets its own); a tensor
    named in ``break_at`` starts a new shard."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and (size + t.nbytes > max_shard_bytes or t.name in break_at):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def write_one_shard(directory: Path, index: int, count: int, tensors: list[OutTensor]) -> tuple[str, str]:
    """Write output shard ``index`` of ``count``; -> (file name, sha256)."""
    name = SHARD_NAME.format(index + 1, count)
    return name, write_shard(directory / name, tensors, {"format": "pt"})


@dataclass
class WriteResult:
    out: Path
    shards: int
    total_bytes: int
    source_bytes: int
    seconds: float
    written_ahead: list[int] = field(default_factory=list)  # shards written while the experts were chosen (``ShardsAhead``), moved in


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MopError(f"--out {out}: exists and is a file; expected a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MopError(f"--out {out}: directory is not empty; pass --overwrite to replace it")


class ShardsAhead:
    """Output shards written while the stages still choose experts.

    With r experts kept in every MoE layer the output's tensors (names, shapes, order), hence its shards, are
    known before any layer is chosen (``plan_tensors``); so each shard is written into ``directory`` (in the run
    directory) as soon as the MoE layer it holds has been chosen (``offer``; ``plan_output`` puts one layer per
    shard at most), and ``write_pruned(ahead=...)`` moves the shards whose layers ended up with the same experts
    into the output and writes the rest.
    """

    def __init__(self, ckpt: Checkpoint, directory: Path, r: int, max_shard_size: str | int, submit):
        """``submit(directory, index, count, tensors)`` -> a concurrent Future of (file name, sha256)."""
        self.ckpt, self.dir, self.r, self.submit = ckpt, Path(directory), r, submit
        placeholder = {i: list(range(r)) for i in ckpt.moe_layers}
        self.layout = plan_output(ckpt, placeholder, parse_size(max_shard_size))
        moe = set(ckpt.moe_layers)
        self.layers = [{ckpt.layer_of(t.name) for t in shard} & moe for shard in self.layout]
        self._names: dict[int, list[str]] = defaultdict(list)  # MoE layer -> its source tensors
        for name in ckpt.tensors:
            if (layer := ckpt.layer_of(name)) in moe:
                self._names[layer].append(name)
        self.keep: dict[int, list[int]] = {}
        self.started: dict[int, tuple[dict[int, list[int]], Future]] = {}  # shard -> (its layers' keep, write)
        self.times: dict[int, list[float | None]] = {}  # shard -> [unix time its write started, ended]
        self._lock = threading.Lock()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)  # (room for the output here is checked before the run: ``check_disk_space``)

    def offer(self, layer: int, kept: list[int]) -> list[int]:
        """Layer ``layer`` keeps ``kept``: start writing every shard whose MoE layers are all chosen now (shards with
        none start at the first offer); -> those shards. A count other than r is ignored (``write_pruned`` then
        writes the whole output)."""
        with self._lock:
            if len(kept) == self.r:
                self.keep[int(layer)] = sorted(int(e) for e in kept)
            started = []
            for i, layers in enumerate(self.layers):
                if i in self.started or not layers <= self.keep.keys():
                    continue
                keep = {j: self.keep[j] for j in layers}
                own = {t.name: t for t in plan_tensors(self.ckpt, keep, [n for j in layers for n in self._names[j]])}
                tensors = [own.get(t.name, t) for t in self.layout[i]]  # the rest does not depend on the keep-map
                self.times[i] = [time.time(), None]
                self.started[i] = (keep, self.submit(self.dir, i, len(self.layout), tensors))
                self.started[i][1].add_done_callback(lambda _, i=i: self.times[i].__setitem__(1, time.time()))
                started.append(i)
            return started

    def reusable(self, shards: list[list[OutTensor]], keep: dict[int, list[int]]) -> dict[int, Future]:
        """The writes started for shards of the final plan ``shards`` whose layers keep what they were written
        with: {shard: Future of (file name, sha256)}; none when the plan is not the layout written ahead."""
        def signature(plan):
            return [[(t.name, t.dtype, tuple(t.shape), t.nbytes) for t in shard] for shard in plan]

        with self._lock:
            if signature(shards) != signature(self.layout):
                return {}
            return {i: f for i, (k, f) in self.started.items() if all(keep[j] == ids for j, ids in k.items())}

    def close(self) -> None:
        """Wait for the writes still running (whatever they end in), then remove the directory."""
        with self._lock:
            futures = [f for _, f in self.started.values()]
            self.started = {}
        for f in futures:
            f.exception()
        shutil.rmtree(self.dir, ignore_errors=True)


def write_pruned(
    src: Checkpoint | str | Path,
    out: str | Path,
    keep_map: dict,
    *,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    info: dict | None = None,
    shard_writer=None,
    allow_nonuniform: bool = False,
    ahead: ShardsAhead | None = None,
) -> WriteResult:
    """Write ``src`` with only the experts in ``keep_map`` to ``out``, atomically.

    ``shard_writer(directory, plans) -> [(name, sha256)]`` may write the shards elsewhere (Ray tasks); by
    default they are written here, one after another. ``info`` is merged into ``pruning.json`` (method, parameters, scores).
    With ``allow_nonuniform`` layers may keep different counts; such a checkpoint is marked so that only
    ``mop_ray.load_pruned`` loads it (``mop_ray.checkpoint.nonuniform``). ``ahead``: shards written while the
    experts were chosen (``ShardsAhead``); those still right are moved in, and ``ahead`` is closed.
    """
    try:
        return _write_pruned(src, out, keep_map, max_shard_size, overwrite, info, shard_writer, allow_nonuniform, ahead)
    finally:
        if ahead is not None:
            ahead.close()


def _write_pruned(src, out, keep_map, max_shard_size, overwrite, info, shard_writer, allow_nonuniform,
                  ahead: ShardsAhead | None) -> WriteResult:
    t0 = time.time()
    ckpt = src if isinstance(src, Checkpoint) else Checkpoint(src)
    out = Path(out).absolute()
    check_out(out, overwrite)
    keep = normalise_keep_map(ckpt, keep_map, uniform=not allow_nonuniform)
    counts = {layer: len(ids) for layer, ids in keep.items()}
    r = max(counts.values())
    nonuniform = len(set(counts.values())) > 1
    shards = plan_output(ckpt, keep, parse_size(max_shard_size))
    total = sum(t.nbytes for s in shards for t in s)
    reuse = ahead.reusable(shards, keep) if ahead is not None else {}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
    except OSError as e:
        raise MopError(f"--out {out}: cannot create its parent directory ({e.strerror})") from None
    need = total - sum(t.nbytes for i in reuse for t in shards[i])  # shards written ahead are moved, not copied
    if free < need:
        raise MopError(f"--out {out}: needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free there")

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise MopError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None
    try:
        def write(indices):
            plans = [(i, len(shards), shards[i]) for i in indices]
            done = shard_writer(tmp, plans) if shard_writer else [write_one_shard(tmp, *p) for p in plans]
            return dict(zip(indices, done))

        written = write([i for i in range(len(shards)) if i not in reuse])
        for i, f in reuse.items():  # written ahead: moved in (a write that failed is done again below)
            if f.exception() is None:
                written[i] = f.result()
                os.replace(ahead.dir / written[i][0], tmp / written[i][0])
        written.update(write([i for i in range(len(shards)) if i not in written]))
        written = [written[i] for i in range(len(shards))]
        weight_map = {t.name: name for (name, _), s in zip(written, shards) for t in s}
        _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        config = ckpt.family.patch_config(ckpt.config, r)
        _write_json(tmp / "config.json", mark_config(config, counts) if nonuniform else config)
        for f in sorted(ckpt.path.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        seconds = time.time() - t0
        _write_json(tmp / "pruning.json", {
            **(info or {}),
            "keep_map": {str(k): v for k, v in sorted(keep.items())},
            "source": str(ckpt.path),
            "family": ckpt.family.name,
            "experts_before": ckpt.num_experts,
            "experts_after": {str(k): v for k, v in sorted(counts.items())} if nonuniform else r,
            "nonuniform": nonuniform,
            "dropped_mtp_layers": ckpt.mtp_layers,
            "bytes_before": ckpt.total_bytes,
            "bytes_after": total,
            "shards": {name: {"sha256": sha, "tensors": len(s)} for (name, sha), s in zip(written, shards)},
            "versions": _versions(),
            "timings": {**(info or {}).get("timings", {}), "write_s": round(seconds, 3)},
        })
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WriteResult(out, len(shards), total, ckpt.total_bytes, time.time() - t0,
                       sorted(i for i in reuse if reuse[i].exception() is None))


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an existing --out is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mop-ray", "transformers", "torch", "safetensors", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out

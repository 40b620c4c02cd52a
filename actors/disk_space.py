"""Room on disk for a run, checked before anything starts: the records (``run_dir/records``) are gigabytes per
MoE layer (a 65,536-row sample of a DeepSeek-V3 layer: 1.9 GB), and a disk that fills up hours into observe
loses the run. The pruned checkpoint is counted where it will be written (``run_dir/shards`` first when shards are
written ahead: the same bytes, moved); stages run in rounds save the hidden states each round hands on
(``run_dir/rounds``, two rounds' for a moment: 7.6 GB for DeepSeek-V3 at 262,144 tokens)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.writer import human_size, plan_tensors
from mop_ray.errors import MopError
from mop_ray.observe.records import layer_dir, sample_row_bytes

MARGIN = 1.05  # Arrow framing, statistics files, the index and config: a few percent at most


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what the file system of a path not yet made is)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def same_file_system(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (made or not yet) are on one file system: a rename moves a file between them."""
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _dtype(job, ckpt: Checkpoint, layer: int):
    """The dtype a layer computes (and hands on its hidden states) in."""
    from mop_ray.arch.layer import compute_dtype, dtype_named

    return dtype_named(job.dtype) or compute_dtype(ckpt, [n for n in ckpt.tensors if ckpt.layer_of(n) == layer])


def records_bytes(job, ckpt: Checkpoint, layers: list[int]) -> tuple[int, int]:
    """(rows per layer, bytes) of the token samples of ``layers`` (``sample_row_bytes`` each)."""
    rows = min(job.sample, job.tokens) if job.sample > 0 else 0
    if not layers or rows == 0:
        return rows, 0
    dtype = _dtype(job, ckpt, layers[0])
    return rows, rows * sample_row_bytes(int(ckpt.config["hidden_size"]), ckpt.num_experts, dtype) * len(layers)


def boundary_bytes(job, ckpt: Checkpoint, rounds: int) -> int:
    """Bytes of the hidden states saved between ``rounds`` rounds (``round_state``): [tokens, H] per boundary, the
    last one and the one being written while the next round runs (the older is removed once the newer is saved)."""
    copies = min(2, rounds - 1)
    if copies <= 0:
        return 0
    hidden = int(ckpt.config["hidden_size"])
    return copies * job.tokens * hidden * _dtype(job, ckpt, ckpt.moe_layers[0]).itemsize


def check_disk_space(job, ckpt: Checkpoint, rounds: int = 1) -> tuple[int, int]:
    """Refuse a run whose new records, hidden states between its ``rounds`` rounds and pruned checkpoint do not fit
    the free space of their file systems; -> (bytes of new records and boundaries, bytes of the output). Records a
    new run removes first (those of an earlier run with a manifest, without ``--resume``) count as free; with
    ``--resume`` a layer whose sample is on disk needs no more (a file that exists is complete)."""
    run_dir, out = Path(job.run_path).absolute(), Path(job.out).absolute()
    todo = [i for i in ckpt.moe_layers if not (job.resume and (layer_dir(run_dir, i) / "sample.arrow").exists())]
    rows, records = records_bytes(job, ckpt, todo)
    between = boundary_bytes(job, ckpt, rounds) if todo else 0
    output = sum(t.nbytes for t in plan_tensors(ckpt, {i: list(range(job.keep)) for i in ckpt.moe_layers}))
    replaced = not job.resume and (run_dir / "manifest.json").exists()  # the run removes the old records first
    freed = _bytes_under(run_dir / "records") if replaced else 0
    freed += _bytes_under(run_dir / "shards")  # an earlier run's shards written ahead: always removed
    if not job.resume:  # an earlier run's hidden states between rounds: removed
        freed += _bytes_under(run_dir / "rounds")
    same = same_file_system(run_dir, out.parent)
    need = (records + between + (output if same else 0)) * MARGIN
    free = shutil.disk_usage(_existing(run_dir)).free + freed
    if need > free:
        what = f"the records of {len(todo)} MoE layers ({rows} sampled rows each, --sample)"
        if between:
            what += f", the hidden states between its {rounds} rounds ({human_size(between)})"
        lower = "--sample or --tokens" if between else "--sample"
        raise MopError(f"--run-dir {run_dir}: {what}{' and the pruned checkpoint' if same else ''} need "
                       f"{human_size(need)} there but {human_size(free)} are free; lower {lower} or use a larger disk")
    if not same and output * MARGIN > (free := shutil.disk_usage(_existing(out.parent)).free):
        raise MopError(f"--out {out}: the pruned checkpoint needs {human_size(output * MARGIN)} but only "
                       f"{human_size(free)} are free there")
    return records + between, output


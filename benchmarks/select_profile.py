"""Where the time of ONE MoE layer's selection goes (``mop`` mainly; also ``enu``, ``gvp``), in-process.

    python benchmarks/select_profile.py --model $D/mixtral-2l --run-dir $D/mixtral-2l-out.run --method mop \
        --keep 4 --repeat 3 --out-json $D/select-profile.json --trace $D/select-trace.json

Needs a run directory with the layer's records (an earlier ``mop-ray prune`` or ``benchmarks/speed.py``).
The layer's MoE block is loaded once onto the device as a selection task would (``LayerContext.moe_block``;
its seconds are reported once), then each repeat runs ``actors.tasks.select_layer`` with that block and
measures wall-clock seconds of the whole call and of its parts, by wrapping these functions where they are
looked up (restored afterwards): ``LayerRecords`` construction, the lazy ``read_sample`` / ``read_stats`` it
defers, ``sample.tensor`` (per column), ``moe_block`` (opens the Checkpoint even with the block given),
``expert_products``, ``search``, ``drop_one_losses`` (enu), ``activation_variability``, ``kmeans``,
``ExpertProducts.single_expert_errors``, ``spearman_ward`` and ``seeding_draws``, which mop runs in a thread
beside stage 1 (reported as concurrent, left out of the sum). On CUDA every part is synchronised before and
after, so a part holds its kernels. "other" = total - the non-concurrent, non-nested parts. Repeat 0 is the
warm-up (imports, cuBLAS init, cold page cache). Method parameters, seed and dtype default to the run's
(``pruning.json`` of its output); the kept set is compared with the run's manifest when it used the same
method and keep. ``--trace``: one more repeat under torch.profiler (parts appear as record_function ranges).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa
import torch

import mop_ray.methods.enu as enu
import mop_ray.methods.mosaic as mosaic
import mop_ray.observe.records as records
from actors import tasks
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.methods.base import LayerContext
from mop_ray.methods.products import ExpertProducts
from mop_ray.prune import layer_context

CUDA = torch.cuda.is_available()
# (where the name is looked up, name, label, concurrent)
PATCHES = [(tasks, "LayerRecords", "LayerRecords()", False), (records, "read_sample", "read_sample", False),
           (records, "read_stats", "read_stats", False), (records.LayerSample, "tensor", "sample.tensor", False),
           (LayerContext, "moe_block", "moe_block", False), (enu, "expert_products", "expert_products", False),
           (enu, "search", "search", False), (mosaic, "search", "search", False),
           (enu, "drop_one_losses", "drop_one_losses", False),
           (mosaic, "activation_variability", "activation_variability", False),
           (mosaic, "seeding_draws", "seeding_draws", True), (mosaic, "kmeans", "kmeans", False),
           (ExpertProducts, "single_expert_errors", "single_expert_errors", False),
           (mosaic, "spearman_ward", "spearman_ward", False)]


def sync():
    if CUDA:
        torch.cuda.synchronize()


class PartTimer:
    """Wraps functions to sum their wall seconds and calls per label; a call inside another timed call of the
    same thread is kept under "<label> (nested)" so the sum counts no time twice."""

    def __init__(self):
        self.parts, self.lock, self.local = {}, threading.Lock(), threading.local()

    def wrap(self, fn, label: str, concurrent: bool):
        def timed(*args, **kwargs):
            key = f"{label}[{args[1] if len(args) > 1 else kwargs.get('name')}]" if label == "sample.tensor" else label
            depth = getattr(self.local, "depth", 0)
            key += " (nested)" if depth else ""
            if not concurrent:
                sync()
            self.local.depth, t0 = depth + 1, time.perf_counter()
            try:
                with torch.profiler.record_function(key):
                    return fn(*args, **kwargs)
            finally:
                if not concurrent:
                    sync()
                dt, self.local.depth = time.perf_counter() - t0, depth
                with self.lock:
                    p = self.parts.setdefault(key, {"s": 0.0, "calls": 0, "concurrent": concurrent})
                    p["s"], p["calls"] = p["s"] + dt, p["calls"] + 1
        return timed

    @contextlib.contextmanager
    def patched(self):
        with contextlib.ExitStack() as stack:
            for owner, name, label, concurrent in PATCHES:
                stack.enter_context(mock.patch.object(owner, name, self.wrap(getattr(owner, name), label, concurrent)))
            yield


def run_params(run_dir: Path) -> tuple[dict, dict]:
    """(the run's manifest, its job parameters from the output's pruning.json, {} when absent)."""
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    out = (manifest.get("phases", {}).get("write") or {}).get("out")
    info = Path(out, "pruning.json") if out else None
    return manifest, (json.loads(info.read_text()).get("parameters", {}) if info and info.exists() else {})


def one_repeat(args, ctx: LayerContext, block) -> dict:
    timer = PartTimer()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    with timer.patched():
        sync()
        t0 = time.perf_counter()
        _, kept, _, _ = tasks.select_layer(str(args.run_dir), ctx, args.method, args.keep, block=block)
        sync()
        total = time.perf_counter() - t0
    counted = sum(p["s"] for k, p in timer.parts.items() if not p["concurrent"] and "(nested)" not in k)
    return {"total_s": total, "other_s": total - counted, "parts": timer.parts, "kept": kept,
            "max_memory_allocated": torch.cuda.max_memory_allocated() if CUDA else None}


def print_table(reps: list[dict]) -> None:
    labels = list(dict.fromkeys(k for r in reps for k in r["parts"]))
    print(f"{'part':<32}" + "".join(f"{'rep ' + str(i) + (' (warm-up)' if i == 0 else ''):>18}" for i in range(len(reps))))
    for k in labels:
        cells = [r["parts"].get(k) for r in reps]
        name = k + (" (concurrent)" if any(c and c["concurrent"] for c in cells) else "")
        print(f"{name:<32}" + "".join(f"{c['s']:>12.4f} s x{c['calls']:<3}" if c else f"{'-':>18}" for c in cells))
    for key in ("other_s", "total_s"):
        print(f"{key[:-2]:<32}" + "".join(f"{r[key]:>12.4f} s     " for r in reps))
    if CUDA:
        print(f"{'max_memory_allocated GiB':<32}" + "".join(f"{r['max_memory_allocated'] / 2**30:>14.3f}    " for r in reps))


def trace(args, ctx: LayerContext, block) -> None:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    timer = PartTimer()
    with torch.profiler.profile(activities=acts) as prof, timer.patched():
        tasks.select_layer(str(args.run_dir), ctx, args.method, args.keep, block=block)
        sync()
    prof.export_chrome_trace(str(args.trace))
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if CUDA else "self_cpu_time_total", row_limit=25))
    print(f"chrome trace: {args.trace}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the checkpoint the run pruned")
    ap.add_argument("--run-dir", type=Path, required=True, help="run directory holding records/layer=NNN/")
    ap.add_argument("--layer", type=int, help="MoE layer (default: the first)")
    ap.add_argument("--method", default="mop", choices=["mop", "enu", "gvp"])
    ap.add_argument("--keep", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=3, help="repeats; the first is the warm-up")
    ap.add_argument("--dtype", help="compute dtype of the block (default: the run's --dtype, else the checkpoint's)")
    ap.add_argument("--out-json")
    ap.add_argument("--trace", help="chrome trace of one extra repeat under torch.profiler")
    args = ap.parse_args()

    manifest, job = run_params(args.run_dir)
    ckpt = Checkpoint(args.model)
    layer = ckpt.moe_layers[0] if args.layer is None else args.layer
    dtype = args.dtype or job.get("dtype")
    params = {**{k: v for k, v in job.get("extra", {}).items() if k != "fault_env"},
              **({"general": job["general"]} if job.get("general") is not None else {})}  # as select_params
    ctx = layer_context(ckpt, layer, job.get("seed", 0), params=params, dtype=dtype)
    ctx.device = "cuda" if CUDA else "cpu"  # what select_layer sets
    t0 = time.perf_counter()
    ckpt.family.modeling()  # the transformers modeling import, kept out of the load
    torch.zeros(1, device=ctx.device)  # and the CUDA context
    sync()
    t1 = time.perf_counter()
    block, _ = ctx.moe_block()  # the layer's MoE block on the device, as a task without a stage's block loads it
    sync()
    load_s = time.perf_counter() - t1
    sample = pa.ipc.open_file(pa.memory_map(str(records.layer_dir(args.run_dir, layer) / "sample.arrow"))).read_all()
    rows, x_type = sample.num_rows, str(sample.schema.field("x").type)  # [N] rows; x: list<float|uint16(bf16)>[H]
    print(f"layer {layer}, {args.method} keep {args.keep} of {ckpt.num_experts}, device {ctx.device}, "
          f"dtype {dtype or 'checkpoint'} ({block.experts.gate_up_proj.dtype}), {rows} sample rows (x: {x_type}), "
          f"params {params}, seed {ctx.seed}")
    print(f"imports + device init {t1 - t0:.3f} s; block load (once) {load_s:.3f} s")

    reps = [one_repeat(args, ctx, block) for _ in range(args.repeat)]
    print_table(reps)
    sel = manifest.get("phases", {}).get("select") or {}
    run_kept = sel.get("keep_map", {}).get(str(layer)) if (sel.get("method"), sel.get("keep")) == (args.method, args.keep) else None
    kept = reps[-1]["kept"]
    same = None if run_kept is None else sorted(run_kept) == sorted(kept)
    print(f"kept {kept}; " + (f"same kept set as the run: {'yes' if same else 'no'} (run: {run_kept})" if run_kept is not None
                              else "the run's manifest has no keep-map of this method and keep"))
    if len({tuple(r["kept"]) for r in reps}) > 1:
        print(f"note: repeats chose different sets: {[r['kept'] for r in reps]}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({
            "model": args.model, "run_dir": str(args.run_dir), "layer": layer, "method": args.method, "keep": args.keep,
            "device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": dtype, "params": params,
            "rows": rows, "x_type": x_type, "imports_device_init_s": t1 - t0, "block_load_s": load_s, "repeats": reps,
            "run_kept": run_kept, "same_as_run": same}, indent=2))
    if args.trace:
        trace(args, ctx, block)


if __name__ == "__main__":
    main()

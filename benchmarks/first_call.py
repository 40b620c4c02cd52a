"""Why a stage's first micro-batch call costs seconds: one LayerShardWorker (in-process, no Ray) on the first
layer(s) of a checkpoint, each case in a fresh process (a cold CUDA context, as a stage actor has).

    python benchmarks/first_call.py --model DIR [--layers 1 --blocks 4 --seq-len 2048 --calls 4 --out-json F]

Cases: ``cold`` (calls timed one by one, GPU-synchronised, after the layers are on the device), ``warmed`` (the
same after the stage's warm-up, ``actors/warm_up.py``, as ``mop-ray prune`` starts its stages), ``profiled``
(the first call under cProfile: where the host's time goes) and ``torch-profiled`` (the first call under
torch.profiler: the CUDA API calls and kernels by total time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import tempfile
import time

CASES = ("cold", "warmed", "profiled", "torch-profiled")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(args) -> dict:
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from actors.layer_shard import LayerShardWorker
    from mop_ray.checkpoint.reader import Checkpoint

    t_imports = time.perf_counter() - t_start
    ckpt = Checkpoint(args.model)
    layers = list(range(args.layers))
    rng = np.random.default_rng(0)
    shape = (args.blocks, args.seq_len)
    ids = torch.from_numpy(rng.integers(0, int(ckpt.config["vocab_size"]), shape))

    def meta():
        return {"source": np.arange(args.blocks) % 2, "block": np.arange(args.blocks),
                "sample": (rng.random(shape) < 0.25).tolist()}

    out = {"case": args.case, "imports_s": round(t_imports, 3)}
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        warm = (args.blocks, args.seq_len) if args.case == "warmed" else None
        w = LayerShardWorker(args.model, layers, run_dir, ["a", "b"], first_stage=True, warm_up=warm)
        w.layers  # noqa: B018 - waits for the loader: the calls are timed apart from the load
        w._warmed.result()  # and for the warm-up, when there is one
        out["warm_up_s"] = round(w.load_times.get("warm_up_s", 0.0), 3)
        sync()
        out["load_s"] = round(time.perf_counter() - t0, 3)
        calls = []
        for mb in range(args.calls):
            m = meta()
            t0 = time.perf_counter()
            if mb == 0 and args.case == "profiled":
                prof = cProfile.Profile()
                prof.enable()
                w.forward(mb, ids, m)
                sync()
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(35)
                out["cprofile"] = s.getvalue()
            elif mb == 0 and args.case == "torch-profiled":
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                with profile(activities=acts) as tp:
                    w.forward(mb, ids, m)
                    sync()
                out["torch_profile"] = tp.key_averages().table(sort_by="cpu_time_total", row_limit=30)
            else:
                w.forward(mb, ids, m)
                sync()
            calls.append(round((time.perf_counter() - t0) * 1e3, 1))
        out["calls_ms"] = calls
        w.finish()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--out-json")
    args = ap.parse_args()
    from mop_ray.bytecode import use_bytecode_cache

    use_bytecode_cache()  # as a stage started by the CLI has it (MOP_RAY_PYCACHE=0: off)
    if args.case:  # a child: one case, its result as JSON on the last line
        print(json.dumps(run_case(args)))
        return
    results = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case] + [
            a for k, v in vars(args).items() if v is not None and k not in ("case", "out_json")
            for a in (f"--{k.replace('_', '-')}", str(v))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"first_call.py: case {case} failed (rc {proc.returncode})")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{case:>15}: imports {r['imports_s']:.2f} s, load {r['load_s']:.2f} s (warm-up {r['warm_up_s']:.2f} s), "
              f"calls (ms) {r['calls_ms']}",
              flush=True)
        for key in ("cprofile", "torch_profile"):
            if key in r:
                print(r[key])
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Where a stage's observe time goes: one LayerShardWorker (in-process, no Ray) on a checkpoint, timed three ways.

    python benchmarks/observe_profile.py --model DIR [--micro-batches 8 --blocks 4 --seq-len 2048 --sample-frac 0.25]

1. the decoder layers alone (``record=False``), 2. plus the observer's statistics (nothing sampled),
3. plus the token sample written to ``sample.arrow`` (``--sample-frac`` of the tokens, as ``--sample`` does). Each
timing is GPU-synchronised, after one warm-up micro-batch; the profile of one micro-batch of case 3 follows
(top CUDA/CPU ops) so the slow part has a name.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from actors.layer_shard import LayerShardWorker


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sample-frac", type=float, default=0.25)
    ap.add_argument("--out-json")
    args = ap.parse_args()

    from mop_ray.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(args.model)
    layers = list(range(ckpt.num_layers))
    rng = np.random.default_rng(0)
    vocab = int(ckpt.config["vocab_size"])
    shape = (args.blocks, args.seq_len)

    def meta(frac):
        return {"source": np.arange(args.blocks) % 2, "block": np.arange(args.blocks),
                "sample": (rng.random(shape) < frac).tolist()}

    result = {"model": args.model, "layers": layers, "tokens_per_micro_batch": args.blocks * args.seq_len}
    with tempfile.TemporaryDirectory() as run_dir:
        for name, record, frac in (("layers only", False, 0.0), ("+ statistics", True, 0.0),
                                   ("+ statistics + sample", True, args.sample_frac)):
            t0 = time.perf_counter()
            w = LayerShardWorker(args.model, layers, run_dir, ["a", "b"], first_stage=True, record=record)
            w.layers  # noqa: B018 - waits for the stage's loader thread: the load is timed apart from the forwards
            sync()
            load = time.perf_counter() - t0
            ids = torch.from_numpy(rng.integers(0, vocab, shape))
            w.forward(0, ids, meta(frac))
            sync()
            t0 = time.perf_counter()
            for mb in range(args.micro_batches):
                w.forward(mb + 1, ids, meta(frac))
            sync()
            per = (time.perf_counter() - t0) / args.micro_batches
            result[name] = {"load_s": round(load, 3), "per_micro_batch_s": round(per, 4),
                            "tokens_per_s": round(args.blocks * args.seq_len / per, 1)}
            print(f"{name:>24}: {per * 1e3:8.1f} ms per micro-batch ({args.blocks * args.seq_len / per:,.0f} tok/s), "
                  f"load {load:.1f} s", flush=True)
            if name.endswith("sample"):
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                with profile(activities=acts) as prof:
                    w.forward(99, ids, meta(frac))
                    sync()
                key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15))
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
            if record:
                w.finish()
            del w
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

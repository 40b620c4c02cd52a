"""A stage's load of one layer: the fused experts read to the host then copied to the GPU, against read straight
onto the GPU through pinned chunks (``layer_state_dict(device=...)``, what ``LayerShardWorker`` does).

    python benchmarks/read_to_device.py --model DIR [--layer N --repeat 2 --out-json FILE]      (on a GPU)

Each case reads the layer and builds it on the GPU (``build_layer``), GPU-synchronised: cold (the checkpoint's
page cache dropped first, as ``speed.py`` does) and warm (right after, from the page cache); the cases alternate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import drop_cache  # noqa: E402

from mop_ray.arch.layer import build_layer, hf_config, layer_state_dict  # noqa: E402
from mop_ray.checkpoint.reader import Checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, help="default: the first MoE layer")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out-json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("read_to_device.py: needs a CUDA GPU")
    ckpt = Checkpoint(args.model)
    i = ckpt.moe_layers[0] if args.layer is None else args.layer
    config, dev = hf_config(ckpt), torch.device("cuda")
    files = sorted({Path(ckpt.tensors[n].path) for n in ckpt.layer_tensors(i)})
    nbytes = sum(ckpt.tensors[n].nbytes for n in ckpt.layer_tensors(i))
    build_layer(ckpt, i, config=config, device=dev)  # CUDA, cuBLAS, pinned buffers: first use paid here
    torch.cuda.synchronize()

    def load(onto):
        t = time.perf_counter()
        sd = layer_state_dict(ckpt, i, packed_fp8=True, device=onto)
        read = time.perf_counter() - t
        layer = build_layer(ckpt, i, config=config, device=dev, state_dict=sd)
        torch.cuda.synchronize()
        del layer, sd
        return read, time.perf_counter() - t

    times = {f"{case} {cache}": [] for case in ("host then GPU", "straight to GPU") for cache in ("cold", "warm")}
    for _ in range(args.repeat):
        for case, onto in (("host then GPU", None), ("straight to GPU", dev)):
            drop_cache(files)
            times[f"{case} cold"].append(load(onto))
            times[f"{case} warm"].append(load(onto))
            torch.cuda.empty_cache()
    result = {"model": args.model, "layer": i, "bytes": nbytes, "gpu": torch.cuda.get_device_name(), "cases": {}}
    for name, runs in times.items():
        total = statistics.median(r[1] for r in runs)
        result["cases"][name] = {"read_s": [round(r[0], 3) for r in runs], "total_s": [round(r[1], 3) for r in runs],
                                 "gb_per_s": round(nbytes / total / 1e9, 2)}
        print(f"{name:>22}: read {statistics.median(r[0] for r in runs):.2f} s, read + build on the GPU "
              f"{total:.2f} s ({nbytes / total / 1e9:.2f} GB/s of {nbytes / 1e9:.2f} GB)", flush=True)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

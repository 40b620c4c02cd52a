"""Where a stage's start goes: imports, CUDA init, and per layer the read, the module fill and the copy to the GPU.

    python benchmarks/load_profile.py --model DIR [--out-json FILE]

Runs in a fresh process with the checkpoint's page cache dropped first (as ``speed.py`` does), so the read
is a cold one; every step is timed on its own (GPU-synchronised) in the order a ``LayerShardWorker`` does it,
and the calibration phase's set-up (``import datasets``, the tokenizer) is timed too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
HERE = str(Path(__file__).resolve().parent)  # captured by value when the profile runs in a Ray actor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out-json")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 8, 16], help="also read the last layer cold "
                    "with these thread counts")
    ap.add_argument("--in-ray", action="store_true", help="run the profile inside a Ray actor with a stage's "
                    "resources (0.1 CPU, 1 GPU when there is one), as the coordinator starts its stages")
    args = ap.parse_args()
    if args.in_ray:
        import ray

        ray.init(include_dashboard=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        argv = [a for a in sys.argv[1:] if a != "--in-ray"]
        actor = ray.remote(num_cpus=0.1, num_gpus=gpus)(Profiler).remote()
        print(ray.get(actor.run.remote(argv)))
        return
    profile(args)


class Profiler:
    def run(self, argv: list[str]) -> str:
        import io
        from contextlib import redirect_stdout

        sys.argv = [sys.argv[0], *argv]
        buf = io.StringIO()
        with redirect_stdout(buf):
            main()
        return buf.getvalue()


def profile(args) -> None:
    sys.path.insert(0, HERE)
    from speed import drop_cache  # noqa: E402

    out: dict = {}
    model = Path(args.model)
    out["page_cache"] = drop_cache(sorted(model.glob("*.safetensors")))

    def step(name, fn):
        t = time.perf_counter()
        res = fn()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        out[name] = round(time.perf_counter() - t, 3)
        print(f"{name:<40} {out[name]:8.3f} s", flush=True)
        return res

    step("import torch", lambda: __import__("torch"))
    import torch

    step("import transformers", lambda: __import__("transformers"))
    step("import datasets", lambda: __import__("datasets"))
    from transformers import AutoTokenizer

    step("tokenizer", lambda: AutoTokenizer.from_pretrained(model))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step("cuda init", lambda: torch.zeros(1, device=dev))
    from mop_ray.arch.layer import hf_config, layer_state_dict
    from mop_ray.checkpoint.reader import Checkpoint

    ckpt = step("checkpoint index", lambda: Checkpoint(model))
    config = step("hf config", lambda: hf_config(ckpt))
    cls = getattr(ckpt.family.modeling(), ckpt.family.decoder_layer_class)
    for i in range(ckpt.num_layers):
        def meta(i=i):
            with torch.device("meta"):
                return cls(config, layer_idx=i)
        layer = step(f"layer {i}: build on meta", meta)
        sd = step(f"layer {i}: read (layer_state_dict)", lambda i=i: layer_state_dict(ckpt, i))
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        out[f"layer {i}: GB"] = round(nbytes / 1e9, 3)
        step(f"layer {i}: load_state_dict(assign)", lambda sd=sd, layer=layer: layer.load_state_dict(sd, strict=True, assign=True))
        layer = step(f"layer {i}: to {dev.type}", lambda layer=layer: layer.to(dev))
        out[f"layer {i}: read GB/s"] = round(nbytes / 1e9 / out[f"layer {i}: read (layer_state_dict)"], 2)
        out[f"layer {i}: copy GB/s"] = round(nbytes / 1e9 / max(out[f"layer {i}: to {dev.type}"], 1e-9), 2)
        del sd
    out["process total"] = round(time.perf_counter() - T0, 3)
    import mop_ray.arch.layer as layer_mod

    last = ckpt.num_layers - 1
    for threads in args.threads:  # a cold read of the last layer with other thread counts
        drop_cache(sorted(model.glob("*.safetensors")))
        layer_mod.READ_THREADS = threads
        sd = step(f"read layer {last}, cold, {threads} threads", lambda: layer_state_dict(ckpt, last))
    if dev.type == "cuda":  # the copy to the GPU from pageable vs pinned host memory
        big = max(sd.values(), key=lambda t: t.numel())
        gb = big.numel() * big.element_size() / 1e9
        step("copy largest tensor, pageable", lambda: big.to(dev))
        pinned = step("pin it", lambda: big.pin_memory())
        step("copy largest tensor, pinned", lambda: pinned.to(dev, non_blocking=True))
        out["copy GB"] = round(gb, 3)
    print(json.dumps(out, indent=1))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

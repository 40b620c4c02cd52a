"""Does a stage's import of torch and transformers' Mixtral layer get shorter when a side thread imports the
torch-free parts meanwhile? Each case runs in a fresh Python process, the cases alternating, after one process
that fills the bytecode cache (``PYTHONPYCACHEPREFIX`` as ``mop_ray.bytecode`` sets it, when given).

  python benchmarks/import_overlap.py [--rounds 3] [--pycache DIR] [--out-json F]

Cases (seconds from the process' first line to torch imported and to the Mixtral layer's module imported):
  seq        import torch; import transformers.models.mixtral.modeling_mixtral
  side-sk    a thread imports scipy.stats and sklearn.metrics (what transformers' candidate_generator imports)
             while the main thread imports torch
  side-deps  the thread also imports huggingface_hub, safetensors, tokenizers and reads the packages' metadata
             (transformers' import_utils)
  torch-sk   torch first, then the thread imports scipy.stats and sklearn.metrics while the main thread imports the
             Mixtral layer (what a stage could do once its actor's module, torch included, is imported)
  no-sk      seq with scikit-learn hidden from transformers (what transformers >= 5.25 does: it imports it only
             when assisted generation uses it); information only, mop-ray does not do this
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASE = r'''
import sys, threading, time
t0 = time.perf_counter()
case = sys.argv[1]
side = None
SK = ("scipy.stats", "sklearn.metrics")
DEPS = SK + ("huggingface_hub", "safetensors", "tokenizers", "regex", "yaml", "packaging.version", "filelock", "tqdm")
if case == "torch-sk":
    import torch
if case.startswith("side") or case == "torch-sk":
    def imports():
        import importlib
        for m in (DEPS if case == "side-deps" else SK):
            importlib.import_module(m)
        if case == "side-deps":
            import importlib.metadata as md
            for d in ("transformers", "torch", "accelerate", "safetensors", "tokenizers", "huggingface_hub", "numpy",
                      "tqdm", "regex", "packaging", "filelock", "pyyaml", "requests", "scipy", "scikit-learn"):
                try:
                    md.version(d)
                except Exception:
                    pass
    side = threading.Thread(target=imports)
    side.start()
if case == "no-sk":
    import importlib.util
    find = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "sklearn" else find(name, *a)
import torch
t1 = time.perf_counter()
if case == "no-sk":
    importlib.util.find_spec = find
    import transformers.utils.import_utils as iu
    iu.is_sklearn_available = lambda: False
    import transformers.utils as tu
    tu.is_sklearn_available = lambda: False
import transformers.models.mixtral.modeling_mixtral  # noqa: F401
t2 = time.perf_counter()
if side is not None:
    side.join()
print(f"{t1 - t0:.3f} {t2 - t0:.3f} {'sklearn' in sys.modules}")
'''

CASES = ("seq", "side-sk", "side-deps", "torch-sk", "no-sk")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pycache", help="a bytecode cache for every process (PYTHONPYCACHEPREFIX, writing allowed)")
    ap.add_argument("--out-json")
    args = ap.parse_args()
    if args.pycache:
        os.environ["PYTHONPYCACHEPREFIX"] = args.pycache
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", CASE, "seq"], capture_output=True)  # fills the bytecode cache
    out: dict[str, list] = {c: [] for c in CASES}
    for rnd in range(args.rounds):
        for case in CASES:
            r = subprocess.run([sys.executable, "-c", CASE, case], capture_output=True, text=True)
            if r.returncode:
                print(f"{case}: failed: {r.stderr.strip()[-400:]}", flush=True)
                continue
            torch_s, total_s, sk = r.stdout.split()
            out[case].append({"torch_s": float(torch_s), "total_s": float(total_s), "sklearn_imported": sk == "True"})
            print(f"round {rnd} {case}: torch {torch_s} s, Mixtral layer {total_s} s, sklearn imported {sk}", flush=True)
    for case, runs in out.items():
        if runs:
            print(f"{case}: median torch {statistics.median(r['torch_s'] for r in runs):.2f} s, "
                  f"median total {statistics.median(r['total_s'] for r in runs):.2f} s over {len(runs)}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

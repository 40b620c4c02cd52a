"""Would a stage be ready sooner if Ray's workers imported torch and transformers before the stage asks for one?
Ray's ``RAY_preload_python_modules`` makes every worker of a raylet import the named modules as it starts (Ray
prestarts workers when the first driver connects), so the stage actor may land on a worker whose imports ran
while the driver went on. Each case is a fresh driver process (a new local Ray), the cases alternating:

  python benchmarks/worker_preload.py [--rounds 3] [--out-json F]

  plain    ray.init, then an actor whose __init__ imports torch and transformers' Mixtral layer
  preload  the same with RAY_preload_python_modules=torch,transformers,<the Mixtral layer's module>

Reported per case: ray.init's seconds, then from the actor's creation to its first answer (``ready_s``, what a
stage's imports cost the job) and the seconds its own imports took (0 when they were preloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODULES = "torch,transformers,transformers.models.mixtral.modeling_mixtral"

CASE = r'''
import json, os, time
t0 = time.time()
import ray
ray.init(address="local", include_dashboard=False)
init_s = time.time() - t0

@ray.remote(num_cpus=0.1)
class Stage:
    def __init__(self):
        t = time.time()
        import torch, transformers  # noqa: F401
        from transformers.models.mixtral import modeling_mixtral  # noqa: F401
        self.imports_s = time.time() - t

    def ready(self):
        return self.imports_s

t1 = time.time()
imports_s = ray.get(Stage.remote().ready.remote())
print(json.dumps({"init_s": round(init_s, 2), "ready_s": round(time.time() - t1, 2), "imports_s": round(imports_s, 2)}))
ray.shutdown()
'''


def one(case: str) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_preload_python_modules", None)
    if case == "preload":
        env["RAY_preload_python_modules"] = MODULES
    out = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-json")
    args = ap.parse_args()
    one("plain")  # fills the page cache and the bytecode caches
    runs = {"plain": [], "preload": []}
    for _ in range(args.rounds):
        for case in runs:
            runs[case].append(one(case))
    result = {case: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs} for case, rs in runs.items()}
    result["cpus"] = os.cpu_count()
    for case in ("plain", "preload"):
        m = result[case]
        print(f"{case:8s} init {m['init_s']:.2f} s  stage ready {m['ready_s']:.2f} s  its imports {m['imports_s']:.2f} s")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Quality benchmark: every method at 75/50/25% of routed experts on the shipped zoo models, per domain.

    python benchmarks/quality.py --out benchmarks/results/quality.json [--models tiny-mixtral tiny-deepseek]
    python benchmarks/quality.py --models smol-moe=out/smol-moe --drop-outputs --out benchmarks/results/quality-smol.json

A model is a shipped zoo name or ``NAME=DIR`` (a checkpoint on disk, e.g. the continued-trained smol-moe:
``benchmarks/smol_moe.sh`` trains it and runs this on a GPU).

The MoP paper's design (Tables 1-2): calibration on (a) general text only — wiki + docs, the paper's "C4"
setting — and (b) the mixed six-domain corpus; metric: held-out perplexity per domain (the corpus' valid
splits, never used for calibration or tuning) and arithmetic multiple-choice accuracy. Records are observed
once per (model, calibration) and every method/ratio reuses them (``--resume`` on one run dir). Runs go
ratio by ratio (both calibrations, every method), so a run stopped by ``--deadline`` leaves whole tables;
results are saved after each run and a rerun with the same ``--out`` skips what is done. Prints Markdown
tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

METHODS = ["random", "frequency", "ean", "reap", "enu", "gvp", "mop", "cprune", "tb-coverage"]
CALIB = {"general": "GENERAL_YAML", "mixed": "default"}


def main() -> None:
    from actors.cluster import connect
    from actors.coordinator import PruneJob, run
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.eval.harness import evaluate
    from mop_ray.zoo import shipped

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"],
                    help="shipped zoo names, or NAME=DIR for a checkpoint on disk")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--tokens", type=int, default=64 * 256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", default="/tmp/mop-ray-quality")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--deadline", type=float, default=None, help="start no new run after this many seconds")
    ap.add_argument("--drop-outputs", action="store_true", help="delete each pruned checkpoint once evaluated")
    ap.add_argument("--dtype", default="float32", help="observation dtype of the prune jobs")
    args = ap.parse_args()
    t_start = time.time()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    general = work / "general.yaml"
    general.write_text("sources:\n  - {default: wiki}\n  - {default: docs}\n")
    connect(None)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    ev_kw = {"seq_len": args.seq_len, "max_tokens": args.eval_tokens, "tasks": ["arithmetic"], "log": lambda *_: None}
    for spec in args.models:
        name, _, path = spec.partition("=")
        model = Path(path) if path else shipped(name)
        n = Checkpoint(model).num_experts
        res = results.setdefault(name, {})
        if "unpruned" not in res:
            res["unpruned"] = evaluate(model, **ev_kw)
            Path(args.out).write_text(json.dumps(results, indent=1))
        for ratio in args.ratios:
            r = int(round(n * ratio))
            for calib, calib_spec in (("general", str(general)), ("mixed", "default")):
                run_dir = work / f"{name}-{calib}.run"
                for method in args.methods:
                    key = f"{calib}/{ratio:.2f}/{method}"
                    if key in res:
                        continue
                    if args.deadline is not None and time.time() - t_start > args.deadline:
                        print(f"deadline ({args.deadline:g}s) reached; rerun with the same --out to go on", flush=True)
                        return
                    t = time.time()
                    out = work / f"{name}-{calib}-{r}-{method}"
                    run(PruneJob(model=str(model), out=str(out), method=method, keep=r, calib=calib_spec,
                                 tokens=args.tokens, seq_len=args.seq_len, run_dir=str(run_dir), resume=True,
                                 overwrite=True, dtype=args.dtype, progress=False), log=lambda *_: None)
                    res[key] = evaluate(out, **ev_kw) | {"keep": r, "prune_seconds": round(time.time() - t, 1)}
                    if args.drop_outputs:
                        shutil.rmtree(out)
                    Path(args.out).write_text(json.dumps(results, indent=1))
                    print(f"{name} {key} r={r}: " + " ".join(f"{d}={v['ppl']:.1f}" for d, v in res[key]["perplexity"].items()), flush=True)
    print(tables(results))


def tables(results: dict) -> str:
    out = []
    for name, res in results.items():
        base = res["unpruned"]
        domains = list(base["perplexity"])
        for calib in ("general", "mixed"):
            keys = sorted({k.split("/")[1] for k in res if k.startswith(calib + "/")}, reverse=True)
            for ratio in keys:
                rows = [(m, res.get(f"{calib}/{ratio}/{m}")) for m in METHODS]
                rows = [(m, v) for m, v in rows if v]
                if not rows:
                    continue
                r = rows[0][1]["keep"]
                out.append(f"\n**{name}, keep {r} ({float(ratio):.0%}), calibration: {calib}** — perplexity per domain "
                           f"(lower is better), arithmetic accuracy, geometric-mean perplexity\n")
                out.append("| method | " + " | ".join(domains) + " | arith acc | geo-mean ppl |")
                out.append("|---|" + "---:|" * (len(domains) + 2))
                for m, v in [("unpruned", base)] + rows:
                    ppl = [v["perplexity"][d]["ppl"] for d in domains]
                    geo = 1.0
                    for p in ppl:
                        geo *= p ** (1 / len(ppl))
                    acc = v["multiple_choice"]["arithmetic"]["acc"]
                    out.append(f"| {m} | " + " | ".join(f"{p:.1f}" for p in ppl) + f" | {acc:.3f} | {geo:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

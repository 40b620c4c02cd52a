"""Quality benchmark: every method at 75/50/25% of routed experts on the shipped zoo models, per domain.

    python benchmarks/quality.py --out benchmarks/results/quality.json [--models tiny-mixtral tiny-deepseek]

The MoP paper's design (Tables 1-2): calibration on (a) general text only — wiki + docs, the paper's "C4"
setting — and (b) the mixed six-domain corpus; metric: held-out perplexity per domain (the corpus' valid
splits, never used for calibration or tuning) and arithmetic multiple-choice accuracy. Records are observed
once per (model, calibration) and every method/ratio reuses them (``--resume`` on one run dir). Prints
Markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--tokens", type=int, default=64 * 256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", default="/tmp/mop-ray-quality")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    general = work / "general.yaml"
    general.write_text("sources:\n  - {default: wiki}\n  - {default: docs}\n")
    connect(None)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    ev_kw = {"seq_len": args.seq_len, "max_tokens": args.eval_tokens, "tasks": ["arithmetic"], "log": lambda *_: None}
    for name in args.models:
        model = shipped(name)
        n = Checkpoint(model).num_experts
        res = results.setdefault(name, {})
        if "unpruned" not in res:
            res["unpruned"] = evaluate(model, **ev_kw)
        for calib, spec in (("general", str(general)), ("mixed", "default")):
            run_dir = work / f"{name}-{calib}.run"
            for ratio in args.ratios:
                r = int(round(n * ratio))
                for method in args.methods:
                    key = f"{calib}/{ratio:.2f}/{method}"
                    if key in res:
                        continue
                    t = time.time()
                    out = work / f"{name}-{calib}-{r}-{method}"
                    run(PruneJob(model=str(model), out=str(out), method=method, keep=r, calib=spec, tokens=args.tokens,
                                 seq_len=args.seq_len, run_dir=str(run_dir), resume=True, overwrite=True,
                                 dtype="float32", progress=False), log=lambda *_: None)
                    res[key] = evaluate(out, **ev_kw) | {"keep": r, "prune_seconds": round(time.time() - t, 1)}
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

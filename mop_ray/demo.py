"""`mop-ray demo`: the main job end to end on the embedded default, offline, on a CPU in minutes.

Builds the demo model, prunes it to half its experts with several methods through the Ray pipeline
(calibrated on the embedded six-domain corpus), evaluates every result per domain (held-out perplexity,
arithmetic multiple choice), and writes one HTML report comparing them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

QUICK = {"methods": ["mop", "frequency"], "tokens": 16 * 64, "seq_len": 64, "eval_tokens": 512, "mc_items": 20}
FULL = {"methods": ["mop", "enu", "reap", "frequency"], "tokens": 96 * 128, "seq_len": 128, "eval_tokens": 4096,
        "mc_items": 200}


def demo_model(work: Path, log) -> Path:
    """The demo model: tiny-mixtral, trained on the six-domain corpus and shipped in the package (5.4M params)."""
    from mop_ray.zoo import shipped

    path = shipped("tiny-mixtral")
    log(f"demo model: {path} (Mixtral architecture, 8 experts top-2, trained on code/docs/wiki/literature/math/qa)")
    return path


def run_demo(out: str | Path | None = None, quick: bool = False, log=print) -> dict:
    from actors.coordinator import PruneJob, run
    from mop_ray.eval.harness import builtin_tasks, evaluate
    from mop_ray.report.html import build_report

    cfg = QUICK if quick else FULL
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="mop-ray-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    model = demo_model(work, log)
    mc = work / "arithmetic.jsonl"
    lines = builtin_tasks()["arithmetic"].read_text().splitlines()[: cfg["mc_items"]]
    mc.write_text("\n".join(lines) + "\n")
    eval_kw = {"seq_len": cfg["seq_len"], "max_tokens": cfg["eval_tokens"], "tasks": [str(mc)], "log": log}
    log("evaluating the unpruned model")
    baseline = evaluate(model, **eval_kw)
    run_dirs, table = [], {"unpruned": baseline}
    for method in cfg["methods"]:
        log(f"--- {method}: 8 -> 4 experts per layer")
        res = run(PruneJob(model=str(model), out=str(work / f"pruned-{method}"), method=method, keep=4,
                           tokens=cfg["tokens"], seq_len=cfg["seq_len"], micro_batch=4, overwrite=True, dtype="float32",
                           progress=not quick), log=log)
        ev = evaluate(res["out"], **eval_kw)
        Path(res["run_dir"], "eval.json").write_text(json.dumps(ev, indent=2))
        run_dirs.append(res["run_dir"])
        table[method] = ev
    report = build_report(run_dirs, work, baseline=baseline, title="mop-ray demo: tiny-mixtral, 8 -> 4 experts per layer")
    log(format_table(table))
    log(f"report: {report}")
    return {"report": str(report), "work": str(work), "results": table}


def format_table(results: dict) -> str:
    domains = sorted({d for ev in results.values() for d in ev["perplexity"]})
    head = f"{'method':<12}" + "".join(f"{d[:10]:>11}" for d in domains) + f"{'arith acc':>11}"
    rows = [head]
    for name, ev in results.items():
        acc = next(iter(ev["multiple_choice"].values()), {}).get("acc")
        rows.append(f"{name:<12}" + "".join(f"{ev['perplexity'][d]['ppl']:>11.2f}" for d in domains)
                    + (f"{acc:>11.3f}" if acc is not None else f"{'-':>11}"))
    return "perplexity per domain (held-out valid split) and arithmetic multiple choice:\n" + "\n".join(rows)

"""`mop-ray eval`: perplexity per domain, multiple choice, and EleutherAI lm-eval when installed and online."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mop_ray.errors import MopError

MC_DIR = Path(__file__).resolve().parent.parent / "data" / "mc"


def load_model(model_dir: str | Path, device: str | None = None):
    import torch
    from transformers import AutoTokenizer

    from mop_ray.load import load_pruned

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model = load_pruned(model_dir, dtype=dtype, device=device)  # non-uniform checkpoints too
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise MopError(f"{model_dir}: cannot load with transformers ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model, tokenizer


def builtin_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(MC_DIR.glob("*.jsonl"))}


def evaluate(model_dir: str | Path, *, data: str = "default", tasks: list[str] | None = None, seq_len: int = 256,
             max_tokens: int = 16384, batch_size: int = 8, device: str | None = None, log=print) -> dict:
    """{"perplexity": {domain: {nll, ppl, tokens}}, "multiple_choice": {task: {acc, acc_norm, items}}, ...}."""
    from mop_ray.eval.multiple_choice import accuracy, read_items
    from mop_ray.eval.perplexity import domain_blocks, perplexity

    t0 = time.time()
    model, tokenizer = load_model(model_dir, device)
    result = {"model": str(model_dir), "perplexity": {}, "multiple_choice": {}}
    if data:
        for domain, blocks in domain_blocks(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens).items():
            result["perplexity"][domain] = perplexity(model, blocks, batch_size)
            log(f"  {domain:<12} ppl {result['perplexity'][domain]['ppl']:10.2f}  ({result['perplexity'][domain]['tokens']} tokens)")
    builtin = builtin_tasks()
    lm_eval_tasks = []
    for task in tasks if tasks is not None else list(builtin):
        path = builtin.get(task) or (Path(task) if Path(task).suffix == ".jsonl" else None)
        if path is None:
            lm_eval_tasks.append(task)
            continue
        if not path.exists():
            raise MopError(f"--tasks {task}: no such file")
        result["multiple_choice"][path.stem] = r = accuracy(model, tokenizer, read_items(path))
        log(f"  {path.stem:<12} acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}  ({r['items']} items)")
    if lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(model_dir, lm_eval_tasks, log)
    result["seconds"] = round(time.time() - t0, 2)
    return result


def run_lm_eval(model_dir, tasks: list[str], log) -> dict:
    """EleutherAI lm-evaluation-harness, when installed; its datasets need network, so offline it is skipped."""
    try:
        import lm_eval
    except ImportError:
        log(f"  lm-eval is not installed; skipped tasks {tasks} (pip install lm-eval)")
        return {"skipped": "lm-eval not installed", "tasks": tasks}
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=tasks)
    except Exception as e:  # noqa: BLE001 - offline runs fail inside the harness with many types
        log(f"  lm-eval failed ({type(e).__name__}); skipped tasks {tasks}")
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "tasks": tasks}
    return {t: v for t, v in out.get("results", {}).items()}


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")

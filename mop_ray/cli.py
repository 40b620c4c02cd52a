"""``mop-ray`` command line: prune, inspect, plan, eval, report, verify, demo.

Every user error is one line, ``mop-ray: error: ...``, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mop_ray import __version__
from mop_ray.checkpoint.writer import human_size as _human
from mop_ray.errors import MopError


PRUNE_DEFAULTS = {
    "method": "random", "keep": None, "general": None, "calib": "default", "tokens": 128 * 2048, "seq_len": 2048,
    "sample": 65536, "seed": 0, "run_dir": None, "address": None, "resume": False, "overwrite": False,
    "keep_map": None, "allow_nonuniform": False, "stages": None, "stage_gpus": None, "stages_at_once": None,
    "micro_batch": 4, "waves": None, "stage_memory": None,
    "max_shard_size": "5GB", "dtype": None,
}
CONFIG_ONLY = {"model", "out"}


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset prune options from --config FILE.yaml (same keys as the flags; flags win), then defaults."""
    values = {}
    if args.config:
        import yaml

        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except FileNotFoundError:
            raise MopError(f"--config {args.config}: no such file") from None
        except yaml.YAMLError as e:
            raise MopError(f"--config {args.config}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MopError(f"--config {args.config}: expected a mapping of option: value, found {type(data).__name__}")
        known = set(PRUNE_DEFAULTS) | CONFIG_ONLY
        for key, value in data.items():
            dest = str(key).replace("-", "_")
            if dest not in known:
                import difflib

                close = difflib.get_close_matches(dest, sorted(known), n=1)
                hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
                raise MopError(f"--config {args.config}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")
            values[dest] = value
    for dest in set(PRUNE_DEFAULTS) | CONFIG_ONLY:
        if getattr(args, dest, None) is None:
            setattr(args, dest, values.get(dest, PRUNE_DEFAULTS.get(dest)))
    for dest in CONFIG_ONLY:
        if getattr(args, dest) is None:
            raise MopError(f"prune: --{dest} is required (on the command line or in --config)")
    return args


def cmd_prune(args: argparse.Namespace) -> int:
    from mop_ray.methods import get_method

    args = apply_config(args)
    if args.keep_map is None and get_method(args.method).needs_records:
        from actors.coordinator import PruneJob, run

        job = PruneJob(**{k: getattr(args, k) for k in PRUNE_DEFAULTS if k not in ("keep_map", "allow_nonuniform")},
                       model=args.model, out=args.out)
        run(job)
        return 0
    from mop_ray.prune import prune

    res = prune(args.model, args.out, method=args.method, keep=args.keep, seed=args.seed,
                keep_map_file=args.keep_map, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                allow_nonuniform=args.allow_nonuniform)
    print(f"wrote {res.out}: {res.shards} shards, {_human(res.total_bytes)} "
          f"({100 * res.total_bytes / res.source_bytes:.1f}% of {_human(res.source_bytes)}) in {res.seconds:.1f}s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.plan import describe, fewest_stages, plan_stages, wave_tokens

    if args.shape_only:
        from mop_ray.shapes import ShapeOnly

        ckpt = ShapeOnly(args.model)
    else:
        ckpt = Checkpoint(args.model)
    if args.gpus is not None and args.gpus < 1:
        raise MopError(f"--gpus {args.gpus}: expected the GPUs the stages run on, at least 1")
    shape = dict(tokens=args.tokens, seq_len=args.seq_len, micro_batch=args.micro_batch, waves=args.waves,
                 dtype=args.dtype)
    if args.gpu_memory is not None:  # the fewest stages (one GPU each) whose memory estimates fit such a GPU
        if args.gpu_memory <= 0:
            raise MopError(f"--gpu-memory {args.gpu_memory:g}: expected the GPU's memory in GiB, e.g. 79.6 for an H100")
        stages = fewest_stages(ckpt, int(args.gpu_memory * 2**30), at_once=args.gpus, **shape)
    else:
        at_once = min(args.stages, args.gpus or args.stages)  # the waves are those of the stages at once (a round's)
        wave = wave_tokens(ckpt, at_once, **shape)
        stages = plan_stages(ckpt, args.stages, micro_batch_tokens=args.micro_batch * args.seq_len, wave_tokens=wave)
    rounds = [len(stages[r:r + args.gpus]) for r in range(0, len(stages), args.gpus)] if args.gpus else [len(stages)]
    if args.json:
        print(json.dumps([s.to_dict() for s in stages], indent=2))
    else:
        if args.gpu_memory is not None:
            print(f"fewest stages whose memory estimates fit a {args.gpu_memory:g} GiB "
                  f"({args.gpu_memory * 2**30 / 1e9:.1f} GB) GPU: {len(stages)}, one GPU each")
        print(describe(stages, ckpt))
        if args.gpu_memory is not None and len(stages) > 1:
            print(one_stage_streaming(ckpt, int(args.gpu_memory * 2**30), f"{args.gpu_memory:g} GiB GPU", shape))
        if len(rounds) > 1:
            from actors.disk_space import boundary_bytes
            from mop_ray.checkpoint.writer import human_size

            print(f"on {args.gpus} GPU(s): {len(rounds)} rounds of {', '.join(map(str, rounds))} stages "
                  f"(what `mop-ray prune --stages {len(stages)}` does on a cluster with that many GPUs); the hidden "
                  f"states between rounds take up to {human_size(boundary_bytes(args, ckpt, len(rounds)))} of disk "
                  "in the run directory")
    return 0


def one_stage_streaming(ckpt, device_bytes: int, device_name: str, shape: dict) -> str:
    """What one stage taking one wave does on a GPU of ``device_bytes`` (it streams the layers that do not fit)."""
    from mop_ray.plan import job_waves, plan_stages, stream_budget, wave_tokens

    if len(job_waves(ckpt, 1, **shape)) > 1:
        return "(one stage would take several waves (--waves): it cannot stream its layers)"
    (st,) = plan_stages(ckpt, 1, micro_batch_tokens=shape["micro_batch"] * shape["seq_len"],
                        wave_tokens=wave_tokens(ckpt, 1, **shape))
    try:
        budget = stream_budget(ckpt, list(st.layers), True, device_bytes, device_name,
                               st.activation_bytes + st.transient_bytes)
    except MopError as e:
        return f"one stage cannot stream them through one such GPU: {e}"
    if budget is None:  # not reached: a plan of one stage that fits is the fewest
        return "1 stage holds every layer on one such GPU"
    return (f"or 1 stage on one such GPU: it takes one wave and streams its layers, holding at most "
            f"{budget / 1e9:.1f} GB of them at once (`mop-ray prune --stages 1`; no pipeline across GPUs)")


def inspect_dict(model: str) -> dict:
    from mop_ray.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(model)
    spec = ckpt.family.router_spec(ckpt.config)
    return {
        "model": str(ckpt.path),
        "family": ckpt.family.name,
        "layers": ckpt.num_layers,
        "experts": ckpt.num_experts,
        "top_k": ckpt.top_k,
        "moe_layers": ckpt.moe_layers,
        "dense_layers": [i for i in range(ckpt.num_layers) if i not in ckpt.moe_layers],
        "mtp_layers": ckpt.mtp_layers,
        "router": {k: v for k, v in spec.__dict__.items()},
        "shared_experts": list(ckpt.family.shared_modules),
        "bytes_per_layer": {str(k): v for k, v in sorted(ckpt.layer_bytes.items())},
        "total_bytes": ckpt.total_bytes,
        "shards": len(set(ckpt.weight_map.values())),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_dict(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    r = info["router"]
    groups = f", {r['n_group']} groups (top {r['topk_group']})" if r["group_score"] else ""
    print(f"{info['model']}\n  family      {info['family']}\n  layers      {info['layers']} "
          f"({len(info['moe_layers'])} MoE, {len(info['dense_layers'])} dense"
          f"{', ' + str(len(info['mtp_layers'])) + ' MTP' if info['mtp_layers'] else ''})\n"
          f"  experts     {info['experts']} routed, top-{info['top_k']}, {r['scoring']} router"
          f"{', renormalised' if r['norm_topk_prob'] else ''}{groups}"
          f"{', shared: ' + '+'.join(info['shared_experts']) if info['shared_experts'] else ''}\n"
          f"  size        {_human(info['total_bytes'])} in {info['shards']} shards")
    for layer, size in info["bytes_per_layer"].items():
        kind = "MTP" if int(layer) in info["mtp_layers"] else "MoE" if int(layer) in info["moe_layers"] else "dense"
        print(f"  layer {int(layer):>4}  {kind:<5} {_human(size):>10}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from actors.cluster import connect
    from mop_ray.demo import run_demo

    connect(None)
    run_demo(args.out, quick=args.quick)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mop_ray.eval.harness import evaluate, write_json

    tasks = None if args.tasks is None else [t for part in args.tasks for t in part.split(",") if t]
    print(f"evaluating {args.model}")
    result = evaluate(args.model, data=args.data, tasks=tasks, seq_len=args.seq_len, max_tokens=args.max_tokens,
                      batch_size=args.batch_size)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mop_ray.checkpoint.verify import verify

    res = verify(args.dir)
    print(f"ok: {args.dir}: {res['family']}, {res['experts']} experts, {res['shards']} shards, "
          f"{res['checksums']} sha256 checked, {_human(res['bytes'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mop_ray.report.html import build_report

    print(f"wrote {build_report(args.run_dirs, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mop-ray", description="Remove whole experts from MoE LLMs.")
    p.add_argument("--version", action="version", version=f"mop-ray {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="write a checkpoint with R experts per MoE layer")
    pr.add_argument("--model", help="source model directory (config.json + safetensors)")
    pr.add_argument("--out", help="output directory (must be new or empty unless --overwrite)")
    pr.add_argument("--method", help="selection method (default random; see README: Methods)")
    pr.add_argument("--keep", type=int, help="experts to keep per MoE layer (R)")
    pr.add_argument("--general", type=int, help="general experts kept by reconstruction loss (MoP, GVP)")
    pr.add_argument("--keep-map", help="JSON {layer: [expert ids]} (or a pruning.json) to apply instead of a method")
    pr.add_argument("--allow-nonuniform", action="store_true", default=None,
                    help="accept a --keep-map with different counts per layer (loads only with mop_ray.load_pruned)")
    pr.add_argument("--calib", help="calibration data: default | FILE | FOLDER | MIXTURE.yaml | HF dataset name")
    pr.add_argument("--tokens", type=int, help="total calibration tokens (default 262144)")
    pr.add_argument("--seq-len", type=int, help="calibration block length (default 2048)")
    pr.add_argument("--sample", type=int, help="tokens per layer kept as records for the methods (default 65536)")
    pr.add_argument("--seed", type=int)
    pr.add_argument("--run-dir", help="records, calib.parquet and manifest (default <out>.run)")
    pr.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    pr.add_argument("--resume", action="store_true", default=None, help="skip phases the run dir's manifest has done")
    pr.add_argument("--stages", type=int, help="pipeline stages (default: one per GPU, one when there is none); more "
                    "than the cluster's GPUs run in rounds (see --stages-at-once)")
    pr.add_argument("--stage-gpus", type=int, help="GPUs each stage reserves (default: 1 when the cluster has one GPU "
                    "per stage at start, else 0); 1 makes an autoscaling cluster start GPU nodes")
    pr.add_argument("--stages-at-once", type=int, help="stages that run at once; fewer than --stages runs them in "
                    "rounds, each round's stages freeing their GPUs for the next (default: all, or as many as the "
                    "cluster has GPUs when it has fewer than stages)")
    pr.add_argument("--micro-batch", type=int, help="calibration blocks per micro-batch (default 4)")
    pr.add_argument("--waves", type=int, help="micro-batch groups each stage takes layer by layer, loading its next "
                    "layer meanwhile (default: 1 with one stage, 4 per stage otherwise; more when a wave's hidden "
                    "states would exceed 4 GiB)")
    pr.add_argument("--stage-memory", type=float, help="GiB of device memory each stage plans for (default: its GPU's "
                    "total; a CPU stage: no limit); a stage taking one wave whose layers exceed it streams them, "
                    "holding a few at a time")
    pr.add_argument("--dtype", help="compute dtype of the stages (default: the checkpoint's)")
    pr.add_argument("--config", help="YAML with the same keys as these flags; flags win")
    pr.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out (atomically)")
    pr.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB or 500MiB")
    pr.set_defaults(fn=cmd_prune)

    pl = sub.add_parser("plan", help="show how layers split into pipeline stages")
    pl.add_argument("--model", required=True)
    pl.add_argument("--stages", type=int, default=1)
    pl.add_argument("--micro-batch", type=int, default=4)
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (sizes the waves; default 262144)")
    pl.add_argument("--waves", type=int, help="as prune's --waves")
    pl.add_argument("--dtype", help="as prune's --dtype")
    pl.add_argument("--gpu-memory", type=float, help="GiB per GPU (nvidia-smi's total, e.g. 79.6 for an H100, 139.8 "
                    "for an H200): plan the fewest stages whose memory estimates fit; --stages is then ignored")
    pl.add_argument("--gpus", type=int, help="GPUs the stages will run on: more stages than that run in rounds, "
                    "each round's waves its own")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--shape-only", action="store_true", help="--model is a config.json (or its folder); no weights needed")
    pl.set_defaults(fn=cmd_plan)

    ins = sub.add_parser("inspect", help="family, layers, experts, top-k and bytes per layer of a model")
    ins.add_argument("--model", required=True)
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(fn=cmd_inspect)

    demo = sub.add_parser("demo", help="prune the built-in model with several methods, evaluate, report (offline)")
    demo.add_argument("--quick", action="store_true", help="a reduced run: two methods, little data")
    demo.add_argument("--out", help="work directory (default: a new temporary directory)")
    demo.set_defaults(fn=cmd_demo)

    ev = sub.add_parser("eval", help="per-domain perplexity and multiple-choice accuracy of a checkpoint")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", default="default", help="held-out text: default (embedded valid splits) or a --calib SPEC")
    ev.add_argument("--tasks", nargs="*", help="built-in MC sets (arithmetic), .jsonl files, or lm-eval task names")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--max-tokens", type=int, default=32768, help="per domain")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", help="write the results here")
    ev.set_defaults(fn=cmd_eval)

    ver = sub.add_parser("verify", help="re-check a written checkpoint: index, headers, sha256, layout")
    ver.add_argument("dir")
    ver.set_defaults(fn=cmd_verify)

    rep = sub.add_parser("report", help="HTML report with plots for one or more run directories")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="folder for report.html and PNGs (default: the first run dir)")
    rep.set_defaults(fn=cmd_report)
    return p


def no_space(error: BaseException) -> OSError | None:
    """The "no space left on device" behind ``error`` (raised here, or in a Ray task or actor: its ``cause``)."""
    import errno

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MopError as e:
        print(f"mop-ray: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a disk that filled up during the run (records, shards): one line, not a traceback
        full = no_space(e)
        if full is None:
            raise
        where = f" ({full.filename})" if full.filename else ""
        print(f"mop-ray: error: no space left on a disk this run writes to{where}; free some (or lower --sample: "
              "the records take most of the run directory) and run the command again", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

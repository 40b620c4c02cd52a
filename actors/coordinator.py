"""The coordinator: plan → calibrate → observe → select → write → verify, resumable through a manifest.

``run_dir/manifest.json`` records the plan hash and what is done (calibration blocks, layers recorded,
keep-map, output written). Re-running the same command with ``--resume`` skips finished phases; a stage
whose layers are all recorded runs forward-only. A different plan (model, data, sample, seed) under
``--resume`` is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from actors.cluster import check_reachable, cluster_gpus, connect, default_stages, started_locally
from actors.disk_space import check_disk_space
from actors.early_writes import EarlyChoices, shards_ahead
from actors.layer_shard import LayerShardWorker
from actors import round_state
from actors.shard_writer import ray_shard_writer
from actors.tasks import combine_layers_task, select_layer_task
from mop_ray.checkpoint.keepmap import check_r
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.writer import check_out, human_size, write_pruned
from mop_ray.errors import MopError
from mop_ray.methods import get_method
from mop_ray.plan import (describe, job_waves, micro_batch_bytes, plan_stages, plan_waves, stage_weight_bytes,
                          wave_tokens)
from mop_ray.prune import layer_context


@dataclass
class PruneJob:
    model: str
    out: str
    method: str = "reap"
    keep: int | None = None
    general: int | None = None
    calib: str = "default"
    tokens: int = 128 * 2048
    seq_len: int = 2048
    sample: int = 65536
    seed: int = 0
    run_dir: str | None = None
    address: str | None = None
    resume: bool = False
    overwrite: bool = False
    stages: int | None = None
    stage_gpus: int | None = None  # GPUs per stage; None: 1 if the cluster has a GPU per stage at the start, else 0
    stages_at_once: int | None = None  # fewer than the stages: rounds of this many (None: see ``stages_at_once``)
    micro_batch: int = 4
    waves: int | None = None  # micro-batch groups a stage takes layer by layer; None: mop_ray.plan.plan_waves decides
    stage_memory: float | None = None  # GiB of device memory a stage plans for; None: its GPU's (a CPU stage: no limit)
    max_inflight: int | None = None  # waves in the pipeline at once; None: ``inflight_limit`` decides
    max_shard_size: str = "5GB"
    dtype: str | None = None
    max_attempts: int = 3
    select_early: bool = True  # stages select a layer beside the next layers' observation (where memory allows)
    write_early: bool = True  # with select_early: each output shard is written once its layers are selected
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(str(Path(self.out).absolute()) + ".run")


class Manifest:
    def __init__(self, path: Path, plan_hash: str, resume: bool, model: str = ""):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else None
        if resume and old is not None and old.get("plan_hash") != plan_hash:
            raise MopError(f"--resume: {path} belongs to a different plan (model, calibration, sample or seed changed)")
        self.data = old if (resume and old) else {"plan_hash": plan_hash, "model": model, "phases": {}}

    def done(self, phase: str):
        return self.data["phases"].get(phase)

    def mark(self, phase: str, value) -> None:
        self.data["phases"][phase] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def plan_hash(job: PruneJob, ckpt: Checkpoint) -> str:
    key = {"model": str(ckpt.path.absolute()), "config": ckpt.config, "calib": job.calib, "tokens": job.tokens,
           "seq_len": job.seq_len, "sample": job.sample, "seed": job.seed, "dtype": job.dtype}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def sample_mask(n_blocks: int, seq_len: int, sample: int, seed: int) -> np.ndarray:
    """[n_blocks, seq_len] bool: a uniform, seeded choice of ``sample`` tokens (all when sample >= tokens)."""
    total = n_blocks * seq_len
    mask = np.zeros(total, dtype=bool)
    if sample >= total:
        mask[:] = True
    elif sample > 0:
        mask[np.random.default_rng(seed).choice(total, size=sample, replace=False)] = True
    return mask.reshape(n_blocks, seq_len)


def calibrate(job: PruneJob, ckpt: Checkpoint, run: Path, manifest: Manifest, log) -> "datasets.Dataset":  # noqa: F821
    t_enter = time.time()
    import datasets
    from transformers import AutoTokenizer

    from mop_ray.data.calib import build_calibration

    t_imports = time.time() - t_enter

    path = run / "calib.parquet"
    if manifest.done("calibrate") and path.exists():
        log(f"calibrate: reusing {path}")
        return datasets.Dataset.from_parquet(str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise MopError(f"{ckpt.path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    t0 = time.time()
    calib = build_calibration(job.calib, tokenizer, tokens=job.tokens, seq_len=job.seq_len, seed=job.seed, out=path)
    manifest.mark("calibrate", {"blocks": len(calib), "seq_len": job.seq_len, "seconds": round(time.time() - t0, 2),
                                "imports_s": round(t_imports, 2), "tokenizer_s": round(t0 - t_enter - t_imports, 2)})
    log(f"calibrate: {len(calib)} blocks x {job.seq_len} tokens from {job.calib!r} in {time.time() - t0:.1f}s "
        f"(imports {t_imports:.1f}s, tokenizer {t0 - t_enter - t_imports:.1f}s before)")
    return calib


def plan_size(job: PruneJob, ckpt: Checkpoint) -> int:
    """The stages of the job's plan: ``--stages``, else one per GPU of the cluster."""
    return job.stages or default_stages(ckpt.num_layers)


def stages_at_once(job: PruneJob, n_stages: int) -> int:
    """How many of the plan's stages run at once: ``job.stages_at_once``, else as many as the cluster has GPUs when
    it has some but fewer than stages (and --stage-gpus is not given), else all. Fewer than all: the stages run in
    rounds (``_observe_rounds``), so a model whose layers need more GPUs than the cluster has still fits."""
    if job.stages_at_once is not None:
        if job.stages_at_once < 1:
            raise MopError(f"--stages-at-once {job.stages_at_once}: expected at least 1")
        return min(job.stages_at_once, n_stages)
    gpus = cluster_gpus()
    return gpus if job.stage_gpus is None and 0 < gpus < n_stages else n_stages


def inflight_limit(job: PruneJob, n_stages: int) -> int:
    """Waves handed to the pipeline and not yet through its last stage: ``job.max_inflight``, else twice the stages
    (at least 4), so that every stage holds a wave with the next one queued and none waits for the driver (with 4
    and 8 stages, half of them did); at most that many waves' hidden states wait in the object store."""
    return job.max_inflight or max(4, 2 * n_stages)


# what Ray raises when a stage actor or its node is gone
STAGE_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.NodeDiedError)
# how long the stages wait for their GPUs: an autoscaler starting cloud GPU nodes can take most of it
PLACEMENT_WAIT_S = float(os.environ.get("MOP_RAY_PLACEMENT_WAIT_S", 1800))


def start_stages(job: PruneJob, ckpt: Checkpoint, run: Path, recorded: set[int], log,
                 which: slice | None = None) -> "LiveStages":
    """Create the stage actors (asynchronously: they load their layers while the caller goes on); they record
    once ``begin(sources)`` is called. ``which``: only these stages of the plan (a round of them)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n_stages = plan_size(job, ckpt)
    # the waves are those of the stages that run at once (a round's, in rounds)
    shape = dict(tokens=job.tokens, seq_len=job.seq_len, micro_batch=job.micro_batch, waves=job.waves, dtype=job.dtype)
    at_once = stages_at_once(job, n_stages)
    stages = plan_stages(ckpt, n_stages, micro_batch_tokens=job.micro_batch * job.seq_len,
                         wave_tokens=wave_tokens(ckpt, at_once, **shape))
    one_wave = len(job_waves(ckpt, at_once, **shape)) == 1  # such a stage may stream layers larger than its device
    if which is None or which.start == 0:
        log(describe(stages, ckpt))
    stages = stages[which] if which is not None else stages
    stage_gpus = job.stage_gpus or 0  # decided once per run by ``run()``, never read off the cluster here
    if stage_gpus:  # an autoscaling cluster with no GPU node yet starts GPU nodes for these bundles
        bundle, actor_res = {"GPU": stage_gpus, "CPU": 0.1}, {"num_gpus": stage_gpus, "num_cpus": 0.1}
    else:
        bundle, actor_res = {"CPU": 0.1}, {"num_cpus": 0.1}
    pg = placement_group([bundle] * len(stages), strategy="PACK")
    if not pg.wait(timeout_seconds=PLACEMENT_WAIT_S):
        ray.util.remove_placement_group(pg)  # an autoscaler would otherwise go on starting nodes for it
        raise MopError(f"could not reserve {len(stages)} x {bundle} for the stages within {PLACEMENT_WAIT_S:g} s "
                       f"(MOP_RAY_PLACEMENT_WAIT_S); cluster has {ray.cluster_resources()}")
    Shard = ray.remote(max_restarts=0, concurrency_groups={"poll": 1})(LayerShardWorker)
    runtime_env = {"env_vars": job.extra["fault_env"]} if job.extra.get("fault_env") else None
    actors = []
    moe = set(ckpt.moe_layers)
    for k, st in enumerate(stages):
        record = any(i in moe and i not in recorded for i in st.layers)
        actors.append(Shard.options(
            **actor_res, runtime_env=runtime_env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=k),
        ).remote(str(ckpt.path), list(st.layers), str(run), None, first_stage=st.index == 0, record=record,
                 dtype=job.dtype, warm_up=(job.micro_batch, job.seq_len), one_wave=one_wave,
                 activation_bytes=st.activation_bytes + st.transient_bytes,
                 memory_bytes=None if job.stage_memory is None else int(job.stage_memory * 2**30)))
    return LiveStages(stages, actors, pg)


def stage_file_bytes(ckpt: Checkpoint, stage) -> int:
    """Bytes a stage reads from the shards: its layers' tensors (FP8 at their file size) and stage 0's embedding."""
    return sum(ckpt.layer_bytes.get(i, 0) for i in stage.layers) + (ckpt.embed_bytes if stage.index == 0 else 0)


def recorded_layers(manifest: Manifest) -> set[int]:
    return set(map(int, (manifest.done("observe") or {}).get("layers", {})))


def prestart_stages(job: PruneJob, ckpt: Checkpoint, run: Path, manifest: Manifest, log) -> "LiveStages | None":
    """The stages for observe (the first round's, in rounds), started before calibration so that their process
    start and weight loads overlap the tokenisation; None when every MoE layer is recorded already."""
    recorded = recorded_layers(manifest)
    if set(ckpt.moe_layers) <= recorded:
        return None
    n_stages = plan_size(job, ckpt)
    at_once = stages_at_once(job, n_stages)
    if at_once >= n_stages:
        return start_stages(job, ckpt, run, recorded, log)
    first = rounds_resume(job, ckpt, run, manifest)
    return start_stages(job, ckpt, run, recorded, log, which=slice(first, first + at_once))


def plan_layers(job: PruneJob, ckpt: Checkpoint) -> list[list[int]]:
    """Each stage's layers in the job's plan."""
    return [list(st.layers) for st in plan_stages(ckpt, plan_size(job, ckpt))]


def rounds_resume(job: PruneJob, ckpt: Checkpoint, run: Path, manifest: Manifest) -> int:
    """The stage the rounds start at: after the last round of this plan saved in the run directory (by an earlier
    attempt of this run, or with --resume by the run it resumes; a new run starts with none), else 0."""
    state = round_state.resume_point(run, manifest, plan_layers(job, ckpt))
    return state["stages_done"] if state else 0


@dataclass
class LiveStages:
    """Running stage actors: started before calibration, kept after observe for selection (with their weights)."""

    stages: list
    actors: list
    pg: object
    early: EarlyChoices | None = None  # passes the layers they select beside the waves to the early shard writes

    def close(self) -> None:
        if self.early is not None:
            self.early.stop()
            self.early = None
        if self.pg is None:
            return
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
        self.actors, self.pg = [], None


def observe(job: PruneJob, ckpt: Checkpoint, calib, run: Path, manifest: Manifest, log,
            started: LiveStages | None = None, on_selected=None) -> tuple[dict, LiveStages | None, dict]:
    """Stream the calibration blocks through the stages; a stage lost mid-way (actor crash, node loss) restarts
    the phase with fresh actors, up to ``job.max_attempts`` times. Records are written only when every
    micro-batch went through, so a replay never double-counts. -> (the phase's manifest state, the stages
    still running when they ran, for selection (the caller closes them), {layer: selection result} of the layers
    stages in rounds selected before their round ended). ``started``: stages from ``prestart_stages`` for the
    first attempt. ``on_selected(layer, kept)``: told of each layer the stages select, as soon as they have
    (``EarlyChoices``; in rounds also at each round's end)."""
    for attempt in range(1, job.max_attempts + 1):
        try:
            return _observe_once(job, ckpt, calib, run, manifest, log, started if attempt == 1 else None, on_selected)
        except (*STAGE_LOST, round_state.InputsLost) as e:  # the last: rounds restart at the last saved round
            if attempt == job.max_attempts:
                raise MopError(f"observe: a stage was lost {attempt} times; last: {str(e).strip().splitlines()[0]}") from None
            why = str(e) if isinstance(e, round_state.InputsLost) else f"a stage was lost ({type(e).__name__})"
            log(f"observe: {why}; restarting the phase (attempt {attempt + 1})")
            drop_partial_samples(run)


def drop_partial_samples(run: Path) -> None:
    """The sample files a lost attempt left half-written (a complete one is renamed into place)."""
    for tmp in run.glob("records/layer=*/.sample.*.arrow"):
        tmp.unlink(missing_ok=True)


def _observe_once(job: PruneJob, ckpt: Checkpoint, calib, run: Path, manifest: Manifest, log,
                  started: LiveStages | None, on_selected=None) -> tuple[dict, LiveStages | None, dict]:
    recorded = recorded_layers(manifest)
    if set(ckpt.moe_layers) <= recorded:
        log("observe: all layers recorded, skipping")
        if started is not None:
            started.close()
        return manifest.done("observe"), None, {}
    n_plan = plan_size(job, ckpt)
    at_once = stages_at_once(job, n_plan)
    if at_once < n_plan:
        return _observe_rounds(job, ckpt, calib, run, manifest, log, n_plan, at_once, on_selected, started)
    sources, ids, block_sources, mask = calibration_arrays(job, calib)
    live = started if started is not None else start_stages(job, ckpt, run, recorded, log)
    stages, actors = live.stages, live.actors
    finished = False
    t0 = time.time()
    inflight = []
    import torch

    bar = tqdm(total=ids.size, unit="tok", desc="observe", disable=not job.progress, unit_scale=True)
    try:
        # surfaces a stage that failed to start (a layer it cannot load surfaces from its loader thread in the
        # first wave, as a MopError)
        begin_stages(job, ckpt, live, sources, on_selected, log)
        where = ray.get([a.where.remote() for a in actors])
        starts = list(range(0, len(ids), job.micro_batch))
        mb_bytes = micro_batch_bytes(ckpt, job.micro_batch, job.seq_len, job.dtype)
        waves = plan_waves(len(starts), len(actors), mb_bytes, job.waves)
        for w, wave in enumerate(waves):
            spans, metas = wave_inputs(job, wave, starts, block_sources, mask)
            ref = [torch.from_numpy(ids[a:b]) for a, b in spans]
            for j, actor in enumerate(actors):  # stage j+1 takes stage j's output (an object ref) directly
                ref = actor.forward_wave.remote(wave, ref, metas, last=j == len(actors) - 1, final=w == len(waves) - 1)
            inflight.append((ref, sum(b - a for a, b in spans) * ids.shape[1]))
            while len(inflight) >= inflight_limit(job, len(actors)):
                ready, _ = ray.wait([r for r, _ in inflight], num_returns=1)
                done = [x for x in inflight if x[0] in ready]
                inflight = [x for x in inflight if x[0] not in ready]
                ray.get([r for r, _ in done])  # surfaces stage errors now
                bar.update(sum(n for _, n in done))
        for ref, n in inflight:
            ray.get(ref)
            bar.update(n)
        results = ray.get([a.finish.remote() for a in actors])
        for w, st, times in zip(where, stages, ray.get([a.loaded.remote() for a in actors])):
            w["load"] = {k: round(v, 3) for k, v in times.items()}
            if times.get("read_s"):
                log(f"observe: stage {st.index} loaded layers {st.layers[0]}-{st.layers[-1]} in {times['total_s']:.1f}s "
                    f"(reads {times['read_s']:.1f}s, {stage_file_bytes(ckpt, st) / 1e9 / times['read_s']:.2f} GB/s, "
                    f"{times.get('prefetched_gb', 0):.1f} GB of them read ahead into the page cache; "
                    f"imports {times['config_s']:.1f}s; builds and copies {times['build_s']:.1f}s)"
                    + (f"; streamed them, holding at most {times['held_peak_gb']:.1f} of "
                       f"{stage_weight_bytes(ckpt, st.layers, False) / 1e9:.1f} GB at once (budget "
                       f"{times['stream_budget_gb']:.1f} GB), {times['room_wait_s']:.1f}s waiting for room"
                       if times.get("stream_budget_gb") else ""))
        finished = True
    except ray.exceptions.RayTaskError as e:
        raise_stage_error(e)
    except ray.exceptions.ActorDiedError as e:  # a stage failed in __init__ (e.g. a layer it cannot load)
        last = str(e).strip().splitlines()[-1]
        if last.startswith("mop_ray.errors.MopError: "):
            raise MopError(last.split(": ", 1)[1]) from None
        raise
    finally:
        bar.close()
        if not finished:
            live.close()
    layers = dict((manifest.done("observe") or {}).get("layers", {}))
    for r in results:
        layers.update({str(k): v for k, v in r.items()})
    seconds = time.time() - t0
    state = {"layers": layers, "stages": [s.to_dict() for s in stages], "placement": where,
             "tokens": int(ids.size), "seconds": round(seconds, 2), "tokens_per_s": round(ids.size / max(seconds, 1e-9), 1)}
    manifest.mark("observe", state)
    log(f"observe: {ids.size} tokens through {len(stages)} stage(s) in {seconds:.1f}s ({ids.size / seconds:.0f} tok/s)")
    return state, live, {}


def begin_stages(job: PruneJob, ckpt: Checkpoint, live: LiveStages, sources: list[str], on_selected, log) -> None:
    """Start the stages recording; with ``job.select_early`` each also selects its MoE layers as the final wave
    passes them, and ``on_selected`` hears of each (``EarlyChoices``)."""
    ahead = select_ahead(job, ckpt)
    ray.get([a.begin.remote(sources, None if ahead is None else ([c for c in ahead[0] if c.layer in st.layers], *ahead[1:]))
             for st, a in zip(live.stages, live.actors)])
    if ahead is not None and on_selected is not None:
        moe = set(ckpt.moe_layers)
        live.early = EarlyChoices(live.actors, [[i for i in st.layers if i in moe] for st in live.stages], on_selected, log)


def select_in_stages(job: PruneJob, ckpt: Checkpoint, live: LiveStages, log, when: str = "") -> dict:
    """The live stages select their MoE layers with the weights in their memory (those selected beside the waves
    return at once) -> {layer: result}; a stage lost meanwhile leaves its layers to tasks, the others' stand."""
    refs = [(st, a.select.remote(selection_contexts(job, ckpt, st.layers), job.method, job.keep))
            for st, a in zip(live.stages, live.actors)]
    chosen = {}
    for st, ref in refs:
        try:
            chosen.update({res[0]: res for res in ray.get(ref)})
        except STAGE_LOST as e:
            log(f"select: the stage holding layers {st.layers[0]}-{st.layers[-1]} was lost{when} "
                f"({type(e).__name__}); selecting its layers in tasks instead")
    return chosen


def select_in_round(job: PruneJob, ckpt: Checkpoint, live: LiveStages, on_selected, log) -> dict:
    """The round's stages select their MoE layers before they go: the weights are in their memory, where selection
    tasks after observe would read every layer again. -> {layer: result}; each is offered to ``on_selected``."""
    chosen = select_in_stages(job, ckpt, live, log, when=" after its round")
    if on_selected is not None:  # deferred layers too (offering a layer twice starts nothing twice)
        for layer, res in chosen.items():
            try:
                on_selected(layer, res[1])
            except Exception as e:  # noqa: BLE001 - the write phase writes whatever did not start here
                log(f"write: could not start writing ahead after layer {layer} ({type(e).__name__}: {e})")
    return chosen


def calibration_arrays(job: PruneJob, calib) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(source names, token ids [n_blocks, seq_len], each block's source index [n_blocks], sample mask
    [n_blocks, seq_len]) of the calibration set."""
    sources = sorted(set(calib["source"]))
    src_idx = {s: i for i, s in enumerate(sources)}
    ids = np.asarray(calib["input_ids"], dtype=np.int64)  # [n_blocks, seq_len]
    block_sources = np.array([src_idx[s] for s in calib["source"]], dtype=np.int64)
    return sources, ids, block_sources, sample_mask(len(ids), ids.shape[1], job.sample, job.seed)


def wave_inputs(job: PruneJob, wave: list[int], starts: list[int], block_sources: np.ndarray,
                mask: np.ndarray) -> tuple[list[tuple[int, int]], list[dict]]:
    """A wave's micro-batches as (first, end) block spans and the metadata each stage takes with them."""
    spans = [(starts[mb], min(starts[mb] + job.micro_batch, len(mask))) for mb in wave]
    return spans, [{"source": block_sources[a:b], "block": np.arange(a, b), "sample": mask[a:b]} for a, b in spans]


def raise_stage_error(e: "ray.exceptions.RayTaskError"):
    """Re-raise a stage method's error: its MopError as itself (one line for the user), anything else as it came."""
    cause = e.cause if getattr(e, "cause", None) is not None else e
    if isinstance(cause, MopError):
        raise cause from None
    raise e


def _observe_rounds(job: PruneJob, ckpt: Checkpoint, calib, run: Path, manifest: Manifest, log, n_plan: int,
                    at_once: int, on_selected=None, started: LiveStages | None = None) -> tuple[dict, None, dict]:
    """Observe with the plan's stages in rounds of ``at_once`` (a model whose layers need more GPUs than the
    cluster has): each round's stages take every wave as the stages of one pipeline do, write their records,
    select their layers (``select_in_round``) and go, freeing their GPUs for the next round, which takes the
    waves' hidden states where the last one left them (Ray's object store: tokens x hidden, e.g. 3.8 GB for
    262,144 tokens of DeepSeek-V3 in bf16). ``started``: the first round's stages, from ``prestart_stages``.
    -> (state, None, {layer: selection result})."""
    import torch

    recorded = recorded_layers(manifest)
    sources, ids, block_sources, mask = calibration_arrays(job, calib)
    starts = list(range(0, len(ids), job.micro_batch))
    # waves for a round's pipeline (one for rounds of one stage: its loading overlaps all its compute), the same
    # in every round, as each stage's memory estimate counts them (``start_stages``)
    waves = plan_waves(len(starts), at_once, micro_batch_bytes(ckpt, job.micro_batch, job.seq_len, job.dtype), job.waves)
    layers = dict((manifest.done("observe") or {}).get("layers", {}))
    stages, where, carried = [], [], [None] * len(waves)  # carried[w]: wave w's hidden states after the last round
    chosen = {}  # layer -> selection result, from each round's stages
    plan = plan_layers(job, ckpt)
    saved = round_state.resume_point(run, manifest, plan)  # as ``rounds_resume``, which prestarted the first round
    first = saved["stages_done"] if saved else 0
    if first:  # after a saved round: its records, choices and output hidden states stand
        layers.update(saved["layers"])
        stages, where = list(saved["stages"]), list(saved["placement"])
        chosen = round_state.chosen_from(saved, job.method, job.keep)
        carried = round_state.put_hidden(run, first, waves)
        log(f"observe: resuming after stage {first - 1} (layers 0-{plan[first - 1][-1]} recorded"
            f"{', selected' if chosen else ''})")
    rounds = [slice(r, r + at_once) for r in range(first, n_plan, at_once)]
    saver = round_state.BoundarySaver(run, manifest, log)
    t0 = time.time()
    bar = tqdm(total=ids.size * len(rounds), unit="tok", desc="observe", disable=not job.progress, unit_scale=True)
    try:
        for r, which in enumerate(rounds):
            final_round = r == len(rounds) - 1
            for attempt in range(1, job.max_attempts + 1):
                prestarted = r == 0 and attempt == 1 and started is not None
                if attempt > 1 and which.start:  # the saved copy of the round's inputs, in case a lost node held them
                    saver.wait()
                    if (round_state.resume_point(run, manifest, plan) or {}).get("stages_done") == which.start:
                        carried = round_state.put_hidden(run, which.start, waves)
                        log(f"observe: round {r + 1}: its inputs from {round_state.boundary_dir(run, which.start)}")
                    else:  # not saved: the object store's copy may have gone with the stage's node
                        raise round_state.InputsLost(f"round {r + 1}: its inputs were not saved")
                live = started if prestarted else start_stages(job, ckpt, run, recorded, log, which=which)
                try:
                    begin_stages(job, ckpt, live, sources, on_selected, log)
                    round_where = ray.get([a.where.remote() for a in live.actors])
                    log(f"observe: round {r + 1} of {len(rounds)}: layers {live.stages[0].layers[0]}-"
                        f"{live.stages[-1].layers[-1]} on {len(live.actors)} stage(s)")
                    outputs = []  # the round's last stage's output per wave: the next round's inputs
                    for w, wave in enumerate(waves):
                        spans, metas = wave_inputs(job, wave, starts, block_sources, mask)
                        ref = [torch.from_numpy(ids[a:b]) for a, b in spans] if r == 0 and not first else carried[w]
                        for j, actor in enumerate(live.actors):
                            ref = actor.forward_wave.remote(wave, ref, metas, last=final_round and j == len(live.actors) - 1,
                                                            final=w == len(waves) - 1)
                        outputs.append(ref)
                    for ref in outputs:  # the last round's results are None; earlier rounds' are not fetched
                        if final_round:
                            ray.get(ref)
                        else:
                            ray.wait([ref], fetch_local=False)
                    for res in ray.get([a.finish.remote(len(waves)) for a in live.actors]):  # a failed wave's error
                        layers.update({str(k): v for k, v in res.items()})
                    for placed, times in zip(round_where, ray.get([a.loaded.remote() for a in live.actors])):
                        placed["load"] = {k: round(v, 3) for k, v in times.items()}
                    chosen.update(select_in_round(job, ckpt, live, on_selected, log))
                    stages += [st.to_dict() for st in live.stages]
                    where += round_where
                    carried = [None if final_round else ref for ref in outputs]  # stay in the object store
                    bar.update(ids.size)
                    if not final_round:  # for --resume, while the next round runs
                        saver.save(which.stop, waves, outputs, {  # a snapshot: the next round adds to these
                            "plan": plan, "layers": dict(layers), "stages": list(stages), "placement": list(where),
                            "method": job.method, "keep": job.keep, "chosen": {str(k): list(v) for k, v in chosen.items()}})
                        if os.environ.get("MOP_RAY_FAULT_DRIVER_EXIT") == "after_round":  # test hook: killed here
                            saver.wait()
                            os.kill(os.getpid(), 9)
                    break
                except ray.exceptions.RayTaskError as e:
                    raise_stage_error(e)
                except STAGE_LOST as e:
                    # the earlier rounds' records, choices and output hidden states (saved in the run directory, and
                    # in the object store unless a lost node held them) stand: only this round runs again
                    if attempt == job.max_attempts:
                        raise MopError(f"observe: round {r + 1}: a stage was lost {attempt} times; last: "
                                       f"{str(e).strip().splitlines()[0]}") from None
                    log(f"observe: round {r + 1}: a stage was lost ({type(e).__name__}); restarting the round "
                        f"(attempt {attempt + 1})")
                    drop_partial_samples(run)
                finally:
                    live.close()
    finally:
        bar.close()
        saver.wait()
    seconds = time.time() - t0
    state = {"layers": layers, "stages": stages, "placement": where, "rounds": len(rounds), "tokens": int(ids.size),
             "seconds": round(seconds, 2), "tokens_per_s": round(ids.size / max(seconds, 1e-9), 1)}
    manifest.mark("observe", state)
    round_state.clear(run)
    log(f"observe: {ids.size} tokens through {n_plan} stage(s) in {len(rounds)} rounds of {at_once} in {seconds:.1f}s "
        f"({ids.size / seconds:.0f} tok/s)")
    return state, None, chosen


def select_params(job: PruneJob) -> dict:
    return {**{k: v for k, v in job.extra.items() if k != "fault_env"},
            **({"general": job.general} if job.general is not None else {})}


def selection_contexts(job: PruneJob, ckpt: Checkpoint, layers) -> list:
    """The selection contexts (``layer_context``) of the MoE layers among ``layers``, in their order."""
    params, moe = select_params(job), set(ckpt.moe_layers)
    return [layer_context(ckpt, i, job.seed, params=params, dtype=job.dtype) for i in layers if i in moe]


def select_ahead(job: PruneJob, ckpt: Checkpoint) -> tuple | None:
    """(contexts, method, r) for the stages to select each MoE layer as soon as the final wave has passed it,
    beside the next layers' observation; None when they should not (``job.select_early``)."""
    if not job.select_early:
        return None
    return selection_contexts(job, ckpt, ckpt.moe_layers), job.method, job.keep


def select_phase(job: PruneJob, ckpt: Checkpoint, run: Path, manifest: Manifest, log,
                 live: LiveStages | None = None, chosen: dict | None = None) -> tuple[dict, dict, dict]:
    """Every MoE layer's kept ids, chosen inside the ``live`` stage actors where they ran (the layers' weights in
    memory, no second read; for record-only methods no process to start and no imports to pay per layer), or
    taken from ``chosen`` ({layer: result} that stages in rounds selected); else (records from an earlier run)
    or when a stage is lost, one Ray task per layer (GPU when the method uses weights and the cluster has GPUs)
    loads what it needs."""
    done = manifest.done("select") or {}
    if done.get("method") == job.method and done.get("keep") == job.keep and set(map(int, done.get("keep_map", {}))) == set(ckpt.moe_layers):
        log("select: reusing the keep-map in the manifest")
        return {int(k): v for k, v in done["keep_map"].items()}, done["scores"], done.get("details", {})
    t0 = time.time()
    params = select_params(job)
    method = get_method(job.method)
    # on GPUs where the stages were (an autoscaler starts one for them), else where the cluster has some now
    gpu = method.needs_weights and (bool(job.stage_gpus) or cluster_gpus() > 0)
    opts = {"num_cpus": 0.5, "num_gpus": 1 if gpu else 0}
    chosen = dict(chosen or {})
    in_stages = len(chosen)
    if live is not None:
        chosen.update(select_in_stages(job, ckpt, live, log))
        in_stages = len(chosen)
        if in_stages < len(ckpt.moe_layers):
            live.close()  # the placement group's GPUs for the tasks (a cluster without spare GPUs waits forever)
    todo = [i for i in ckpt.moe_layers if i not in chosen]
    if todo:
        refs = [select_layer_task.options(**opts).remote(str(run), ctx, job.method, job.keep)
                for ctx in selection_contexts(job, ckpt, todo)]
        chosen.update({res[0]: res for res in tqdm(ray.get(refs), desc="select", disable=not job.progress)})
    where = ("stages" if not todo else "tasks" if not in_stages
             else f"stages and tasks ({in_stages} of {len(ckpt.moe_layers)} layers in the stages)")
    results = [chosen[i] for i in ckpt.moe_layers]
    if method.combine is not None:  # a cross-layer stage (C-Prune global) picks the final ids of every layer
        # numpy over every layer's pooled outputs: no GPU (the stages may still hold every one of them)
        combine = combine_layers_task.options(num_cpus=0.5)
        results = ray.get(combine.remote(str(ckpt.path), job.method, results, job.keep, params))
    keep, scores, details = {}, {}, {}
    for layer, kept, sc, det in results:
        keep[layer], scores[str(layer)], details[str(layer)] = kept, sc, det
    manifest.mark("select", {"method": job.method, "keep": job.keep, "keep_map": {str(k): v for k, v in keep.items()},
                             "scores": scores, "details": details, "seconds": round(time.time() - t0, 2), "in": where})
    counts = sorted({len(v) for v in keep.values()})
    kept_text = job.keep if len(counts) == 1 else f"{counts[0]}-{counts[-1]} (non-uniform, {job.keep} on average)"
    log(f"select: {job.method} kept {kept_text} of {ckpt.num_experts} experts in {len(keep)} layers "
        f"({time.time() - t0:.1f}s, in the {where})")
    return keep, scores, details


SELECT_MEMORY_GB = float(os.environ.get("MOP_RAY_SELECT_MEMORY_GB", 64))


def check_selection_memory(ckpt: Checkpoint, job: PruneJob) -> None:
    """Refuse a --sample whose per-layer products (``mop_ray.methods.products``) exceed the selection budget."""
    from mop_ray.methods.products import layer_selection_bytes

    n = min(job.sample, job.tokens) if job.sample > 0 else 0
    half = str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "bfloat16") in ("bfloat16", "float16")
    need = layer_selection_bytes(ckpt, n, half) / 2**30
    if need > SELECT_MEMORY_GB:
        most = int(job.sample * SELECT_MEMORY_GB / need)
        raise MopError(f"--sample {job.sample}: selecting with {job.method} needs {need:.1f} GiB per layer for the "
                       f"sample's expert products, over the {SELECT_MEMORY_GB:g} GiB budget "
                       f"(MOP_RAY_SELECT_MEMORY_GB); use --sample {most} or less")


def run(job: PruneJob, log=print) -> dict:
    """Prune ``job.model`` into ``job.out`` with a calibration-based method; returns a summary dict."""
    t_start = time.time()
    ckpt = Checkpoint(job.model)
    method = get_method(job.method)
    if job.keep is None:
        raise MopError("prune: pass --keep R (experts to keep per layer)")
    check_r(ckpt, job.keep)
    if job.waves is not None and job.waves < 1:
        raise MopError(f"--waves {job.waves}: expected at least 1 (micro-batch groups per stage)")
    if job.stage_memory is not None and not job.stage_memory > 0:
        raise MopError(f"--stage-memory {job.stage_memory:g}: expected the GiB of device memory a stage plans for, "
                       "e.g. 70")
    check_out(Path(job.out).absolute(), job.overwrite)
    if method.needs_weights and method.needs_records:
        check_selection_memory(ckpt, job)  # a sample too large for selection fails now, not after observe
    if method.needs_records:  # records and output that would not fit fail now, not hours into observe
        check_disk_space(job, ckpt)  # before Ray starts; the hidden states between rounds are counted below
    check_reachable(job.address)  # an --address nobody answers on fails now, before anything is written
    connect(job.address)
    n_stages = plan_size(job, ckpt)
    at_once = stages_at_once(job, n_stages)
    need = (job.stage_gpus or 0) * at_once  # the stages that run at once
    have = cluster_gpus()
    if need and started_locally() and have < need:
        raise MopError(f"--stage-gpus {job.stage_gpus}: the stages need {need} GPUs but this machine's Ray has {have} "
                       "and no autoscaler; lower --stages or --stages-at-once, or drop stage-gpus")
    if job.stage_gpus is None:  # decided once: a restart while a lost node's replacement has yet to join (the
        # cluster without a GPU for a moment) places its stages as the first attempt did, not on CPUs, all at once
        job = replace(job, stages_at_once=at_once, stage_gpus=int(0 < at_once <= have))
    if method.needs_records:
        rounds = -(-n_stages // at_once)
        records, output = check_disk_space(job, ckpt, rounds)
        log(f"disk: {human_size(records)} of new records{' and hidden states between rounds' if rounds > 1 else ''} "
            f"in {job.run_path}, {human_size(output)} of output")
    run_dir = job.run_path
    if run_dir.exists() and not job.resume and (run_dir / "manifest.json").exists():
        shutil.rmtree(run_dir / "records", ignore_errors=True)
        (run_dir / "manifest.json").unlink()
    shutil.rmtree(run_dir / "shards", ignore_errors=True)  # an earlier run's shards written ahead (ShardsAhead)
    if not job.resume:
        round_state.clear(run_dir)  # an earlier run's hidden states between rounds
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir / "manifest.json", plan_hash(job, ckpt), job.resume, str(ckpt.path.absolute()))
    fault_env = {"env_vars": job.extra["fault_env"]} if job.extra.get("fault_env") else None
    timings = {}
    live = ahead = chosen = None
    try:
        try:
            if method.needs_records:
                t = time.time()
                live = prestart_stages(job, ckpt, run_dir, manifest, log)  # they load while calibration tokenises
                if live is not None and job.select_early and job.write_early and method.combine is None:
                    ahead = shards_ahead(ckpt, Path(job.out).absolute(), run_dir, job.keep, job.max_shard_size, fault_env, log)
                calib = calibrate(job, ckpt, run_dir, manifest, log)
                timings["calibrate_s"] = round(time.time() - t, 2)
                t = time.time()
                _, live, chosen = observe(job, ckpt, calib, run_dir, manifest, log, started=live,
                                          on_selected=ahead.offer if ahead is not None else None)
                timings["observe_s"] = round(time.time() - t, 2)
            t = time.time()
            keep, scores, details = select_phase(job, ckpt, run_dir, manifest, log, live, chosen)
            timings["select_s"] = round(time.time() - t, 2)
        finally:
            if live is not None:
                live.close()
        if os.environ.get("MOP_RAY_FAULT_DRIVER_EXIT") == "after_select":  # test hook: the driver is killed here
            os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, no atexit, like an OOM kill
    except BaseException:
        if ahead is not None:
            ahead.close()
        raise
    info = {"method": job.method, "parameters": {k: v for k, v in asdict(job).items() if k not in ("progress", "address")},
            "scores": scores, "details": details, "timings": timings, "run_dir": str(run_dir)}
    res = write_pruned(ckpt, job.out, keep, max_shard_size=job.max_shard_size, overwrite=job.overwrite, info=info,
                       allow_nonuniform=method.combine is not None, shard_writer=ray_shard_writer(runtime_env=fault_env),
                       ahead=ahead)
    manifest.mark("write", {"out": str(res.out), "shards": res.shards, "bytes": res.total_bytes, "seconds": round(res.seconds, 2),
                            "written_ahead": res.written_ahead,
                            "ahead_unix": {str(i): ahead.times.get(i) for i in res.written_ahead} if ahead is not None else {}})
    out = Checkpoint(res.out)  # verify: the output parses, has the kept counts and every MoE router
    found = {i: out.experts_in(i) for i in out.moe_layers}
    if found != {i: len(v) for i, v in keep.items()}:
        raise MopError(f"verify: {res.out} has experts per layer {found}; expected {job.keep} (keep-map {keep})")
    manifest.mark("verify", {"ok": True})
    ahead_text = f", {len(res.written_ahead)} of them while selecting" if res.written_ahead else ""
    log(f"wrote {res.out}: {res.shards} shards{ahead_text}, {res.total_bytes / 1e6:.1f} MB "
        f"({100 * res.total_bytes / res.source_bytes:.1f}% of the source) in {time.time() - t_start:.1f}s")
    return {"out": str(res.out), "run_dir": str(run_dir), "keep_map": keep, "timings": timings}

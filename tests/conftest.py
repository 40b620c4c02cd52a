"""Shared fixtures: tiny random checkpoints of every family, built once per test session."""

from __future__ import annotations

import os
from contextlib import contextmanager

# Keep Ray on loopback and off token auth in tests (README: "Ray on a laptop / in CI"); set before any import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# On an install without compiled bytecode that cannot take it (PYTHONDONTWRITEBYTECODE, as on the lent GPU
# machines), the cache mop-ray's own Ray start would set (mop_ray.bytecode), set once for the whole session: the
# tests' jobs then find it set and change nothing (``_bytecode_settings_kept``). A no-op where packages are compiled.
from mop_ray.bytecode import use_bytecode_cache  # noqa: E402

use_bytecode_cache()

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton's CPU interpreter for the fused kernels' tests (test_kernels.py) where there is no GPU: it must be chosen
# before Triton's first import; the kernels still run only where a test sets MOP_RAY_FUSED=interpret.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"]


@pytest.fixture(autouse=True)
def _bytecode_settings_kept():
    """Fails a test that leaves PYTHONPYCACHEPREFIX or PYTHONDONTWRITEBYTECODE changed: every later Ray worker of
    the session would inherit them (a prefix whose cache is never written compiles every import from source; it
    made the suite twice as slow once)."""
    keys = ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")
    before = {k: os.environ.get(k) for k in keys}
    yield
    after = {k: os.environ.get(k) for k in keys}
    assert after == before, f"the test changed the bytecode settings of later processes: {before} -> {after}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: path} of tiny random checkpoints, several shards each, with a tokenizer."""
    from transformers.utils import logging

    from mop_ray.zoo.tiny import build_tiny

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


LOCAL_RAY = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # the tests' Ray


@pytest.fixture
def ray_local():
    """A local Ray instance (loopback only), shared by tests; a test that needs another cluster shuts it down."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray


@contextmanager
def fake_gpus(ray, n: int):
    """The tests' local Ray started again with ``n`` fake GPUs for the block, then again without (what comes next
    finds the tests' Ray, not one a job starts and mop-ray counts as its own)."""
    ray.shutdown()
    ray.init(**LOCAL_RAY, num_gpus=n)
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(**LOCAL_RAY)


def small_job(model, out, **kw):
    from actors.coordinator import PruneJob

    base = dict(model=str(model), out=str(out), method="reap", keep=4, tokens=8 * 32, seq_len=32, sample=10_000,
                micro_batch=2, stages=1, overwrite=True, progress=False)
    base.update(kw)
    return PruneJob(**base)


def run_meanwhile(job, when, then, *, within: float = 300.0):
    """``job()`` on a thread while the main thread calls ``then()`` once ``when()`` holds (within ``within`` s; a
    ``ray.cluster_utils.Cluster`` adds and removes nodes on the main thread only: it sets signal handlers);
    -> (job's result, whether ``then`` ran); the job's exception is raised here."""
    import threading
    import time

    result = {}

    def target():
        try:
            result["value"] = job()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            result["error"] = e

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    deadline, done = time.time() + within, False
    while not done and runner.is_alive() and time.time() < deadline:
        if when():
            then()
            done = True
        time.sleep(0.05)
    runner.join(timeout=600)
    if "error" in result:
        raise result["error"]
    return result["value"], done


_RECORDS: dict = {}


def record_layers(model_dir, run_dir, tokens=8 * 32, seq_len=32, sample=10_000, outputs=False):
    """Calibration records of every MoE layer, made in-process by the stage actor's class (no Ray); ``outputs``:
    the sampled rows keep their outputs z where the recorded products make them unnecessary (``records_outputs``)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from actors.coordinator import sample_mask
    from actors.layer_shard import LayerShardWorker
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.data.calib import build_calibration

    ckpt = Checkpoint(model_dir)
    calib = build_calibration("default", AutoTokenizer.from_pretrained(model_dir), tokens=tokens, seq_len=seq_len,
                              seed=0, out=f"{run_dir}/calib.parquet")
    sources = sorted(set(calib["source"]))
    ids = np.asarray(calib["input_ids"], dtype=np.int64)
    src = np.array([sources.index(s) for s in calib["source"]])
    mask = sample_mask(len(ids), seq_len, sample, 0)
    worker = LayerShardWorker(str(model_dir), list(range(ckpt.num_layers)), str(run_dir), sources, first_stage=True)
    with pytest.MonkeyPatch.context() as m:
        if outputs:
            m.setenv("MOP_RAY_RECORD_OUTPUTS", "1")
        for start in range(0, len(ids), 2):
            sl = slice(start, start + 2)
            worker.forward(start, torch.from_numpy(ids[sl]), {"source": src[sl], "block": np.arange(len(ids))[sl], "sample": mask[sl]})
    worker.finish()
    return run_dir


def _records_getter(tiny_models, tmp_path_factory, outputs: bool):
    def get(family):
        if (family, outputs) not in _RECORDS:
            run_dir = tmp_path_factory.mktemp(f"rec-{family}{'-z' if outputs else ''}")
            _RECORDS[family, outputs] = record_layers(tiny_models[family], run_dir, outputs=outputs)
        return _RECORDS[family, outputs]
    return get


@pytest.fixture
def records(tiny_models, tmp_path_factory):
    """family -> run_dir with records of every MoE layer, as a run writes them (built once per family per session)."""
    return _records_getter(tiny_models, tmp_path_factory, outputs=False)


@pytest.fixture
def records_with_outputs(tiny_models, tmp_path_factory):
    """``records`` whose sampled rows also keep their outputs z (``MOP_RAY_RECORD_OUTPUTS=1``), for checks against
    running the experts on the sample again."""
    return _records_getter(tiny_models, tmp_path_factory, outputs=True)

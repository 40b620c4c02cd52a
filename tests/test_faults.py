"""Fault injection with real Ray: a stage process dies mid-observe, a writer task dies mid-write, a node is
lost, the driver is killed after selection and resumed. The run completes and its checkpoint is
byte-identical to an undisturbed run with the same seed."""

from __future__ import annotations

import json
import os

import numpy as np

from actors.coordinator import run
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.observe.records import STAT_FIELDS, read_stats

from conftest import fake_gpus, run_meanwhile, small_job


def shard_bytes(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return index["weight_map"], {s: (out / s).read_bytes() for s in set(index["weight_map"].values())}


def assert_same_stats(calm_run, hit_run, model, tokens):
    for layer in Checkpoint(model).moe_layers:
        a, b = read_stats(calm_run, layer), read_stats(hit_run, layer)
        assert a.n_tokens == b.n_tokens == tokens  # no micro-batch counted twice
        for f in STAT_FIELDS:
            np.testing.assert_allclose(a.by_source[f], b.by_source[f], rtol=1e-9, atol=1e-12)


def test_stage_and_writer_crashes_are_survived(tiny_models, tmp_path, ray_local):
    model = tiny_models["deepseek_v3"]
    kw = dict(stages=2, tokens=16 * 32, micro_batch=2, max_shard_size="100KB")
    calm = run(small_job(model, tmp_path / "calm", **kw), log=lambda *_: None)
    logs = []
    env = {"MOP_RAY_FAULT_EXIT": f"2:3:{tmp_path / 'stage.marker'}",  # the stage holding layer 2 dies at micro-batch 3
           "MOP_RAY_FAULT_WRITE": f"1:{tmp_path / 'write.marker'}"}   # the task writing shard 2 dies once
    hit = run(small_job(model, tmp_path / "hit", extra={"fault_env": env}, **kw), log=logs.append)
    assert (tmp_path / "stage.marker").exists() and (tmp_path / "write.marker").exists()  # both faults happened
    assert any("restarting the phase" in line for line in logs)
    assert hit["keep_map"] == calm["keep_map"]
    assert_same_stats(tmp_path / "calm.run", tmp_path / "hit.run", model, tokens=512)
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "hit")
    assert not list((tmp_path / "hit.run" / "records").glob("layer=*/.sample.*"))


def test_a_stage_lost_in_a_middle_round_restarts_that_round(tiny_models, tmp_path, ray_local):
    """Stages in rounds (one at a time): the stage of the middle round dies at micro-batch 3, whose waves' results the
    coordinator does not fetch (they stay in the object store for the next round); its ``finish`` surfaces the loss
    and only that round runs again, from the first round's hidden states as saved in the run directory (a lost node
    may have held them); the records and output equal an undisturbed run's — or, where that copy could not be
    saved, the phase restarts at round 1. A stage that dies selecting at its round's end (after its waves) leaves
    its layer to a task while the next rounds go on: the same output."""
    model = tiny_models["deepseek_v3"]
    kw = dict(stages=3, stages_at_once=1, tokens=16 * 32, micro_batch=2, max_shard_size="100KB")
    calm = run(small_job(model, tmp_path / "calm", **kw), log=lambda *_: None)
    logs = []
    env = {"MOP_RAY_FAULT_EXIT": f"1:3:{tmp_path / 'stage.marker'}"}  # the stage holding layer 1 (round 2 of 3)
    hit = run(small_job(model, tmp_path / "hit", extra={"fault_env": env}, **kw), log=logs.append)
    assert (tmp_path / "stage.marker").exists() and any("round 2: a stage was lost" in line for line in logs), logs
    assert [sum(m.startswith(f"observe: round {r} of 3") for m in logs) for r in (1, 2, 3)] == [1, 2, 1]
    assert any(m.startswith("observe: round 2: its inputs from ") for m in logs)  # the copy saved after round 1
    assert hit["keep_map"] == calm["keep_map"]
    assert_same_stats(tmp_path / "calm.run", tmp_path / "hit.run", model, tokens=512)
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "hit")

    # the hidden states cannot be saved (a file where their folder goes): the round's inputs in the object store
    # may have gone with a lost node, so the phase restarts at the first round
    logs = []
    (tmp_path / "unsaved.run").mkdir()
    (tmp_path / "unsaved.run" / "rounds").write_text("")
    env = {"MOP_RAY_FAULT_EXIT": f"1:3:{tmp_path / 'unsaved.marker'}"}
    unsaved = run(small_job(model, tmp_path / "unsaved", extra={"fault_env": env}, **kw), log=logs.append)
    assert any(m.startswith("observe: could not save the hidden states after stage 0") for m in logs), logs
    assert any("round 2: its inputs were not saved; restarting the phase" in m for m in logs), logs
    assert [sum(m.startswith(f"observe: round {r} of 3") for m in logs) for r in (1, 2, 3)] == [2, 2, 1]
    assert unsaved["keep_map"] == calm["keep_map"]
    assert_same_stats(tmp_path / "calm.run", tmp_path / "unsaved.run", model, tokens=512)
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "unsaved")

    logs = []
    env = {"MOP_RAY_FAULT_EXIT": f"1:select:{tmp_path / 'select.marker'}"}  # round 2's stage, selecting layer 1
    late = run(small_job(model, tmp_path / "late", extra={"fault_env": env}, select_early=False, **kw), log=logs.append)
    assert (tmp_path / "select.marker").exists()
    assert any("holding layers 1-1 was lost after its round" in line for line in logs), logs
    assert not any("restarting the phase" in line for line in logs)
    moe = Checkpoint(model).moe_layers
    select = json.loads((tmp_path / "late.run" / "manifest.json").read_text())["phases"]["select"]
    assert select["in"] == f"stages and tasks ({len(moe) - 1} of {len(moe)} layers in the stages)"
    assert late["keep_map"] == calm["keep_map"]
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "late")


def test_a_stage_lost_while_selecting_after_or_beside_observe(tiny_models, tmp_path, ray_local):
    """Selecting after observe (select_early=False), the stage selecting layer 2 dies: its layers go to tasks, the
    other stage's choice stands, and the tasks get the GPUs the stages held (two fake GPUs, both the stages'; before,
    the tasks waited for a GPU forever). Selecting beside observe, stage 0 (layers 0-1) dies in its worker thread
    selecting layer 1 while stage 1 still observes layer 2: depending on when the process goes, observe restarts
    with fresh stages or the select phase hands the stage's layers to tasks (on a machine of one GPU, where the two
    stages run in rounds, the round restarts). Both outputs equal an undisturbed
    run's. The undisturbed run and the one losing a stage beside observe write shards while the stages select
    (``ShardsAhead``)."""
    model = tiny_models["deepseek_v3"]
    kw = dict(stages=2, method="mop", max_shard_size="100KB")

    def phases(name):
        return json.loads((tmp_path / f"{name}.run" / "manifest.json").read_text())["phases"]

    calm = run(small_job(model, tmp_path / "calm", **kw), log=lambda *_: None)
    assert phases("calm")["select"]["in"] == "stages"
    assert len(phases("calm")["write"]["written_ahead"]) > 1

    logs = []
    env = {"MOP_RAY_FAULT_EXIT": f"2:select:{tmp_path / 'after.marker'}"}
    with fake_gpus(ray_local, 2):
        hit = run(small_job(model, tmp_path / "after", extra={"fault_env": env}, select_early=False, **kw),
                  log=logs.append)
    assert (tmp_path / "after.marker").exists()
    assert any("holding layers 2-2 was lost (ActorDiedError); selecting its layers in tasks" in m for m in logs), logs
    moe = Checkpoint(model).moe_layers
    assert phases("after")["select"]["in"] == f"stages and tasks ({len(moe) - 1} of {len(moe)} layers in the stages)"
    assert phases("after")["write"]["written_ahead"] == []
    assert all(len(p["gpus"]) == 1 for p in phases("after")["observe"]["placement"])  # the stages held both GPUs
    assert hit["keep_map"] == calm["keep_map"]
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "after")

    logs = []
    env = {"MOP_RAY_FAULT_EXIT": f"1:select:{tmp_path / 'beside.marker'}"}
    hit = run(small_job(model, tmp_path / "beside", extra={"fault_env": env}, **kw), log=logs.append)
    assert (tmp_path / "beside.marker").exists()
    assert any(why in line for line in logs
               for why in ("restarting the phase", "selecting its layers in tasks", "restarting the round")), logs
    assert hit["keep_map"] == calm["keep_map"]
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "beside")
    assert not (tmp_path / "beside.run" / "shards").exists() and not list(tmp_path.glob(".beside*"))


def test_losing_a_node_during_observe(tiny_models, tmp_path, ray_local):
    """Remove the node that holds a stage while micro-batches stream; a replacement node joins (as the
    autoscaler would bring one); the run completes with the undisturbed result."""
    import time

    import ray
    from ray.cluster_utils import Cluster

    model = tiny_models["qwen3_moe"]
    kw = dict(stages=3, tokens=96 * 32, micro_batch=1)
    calm = run(small_job(model, tmp_path / "calm", **kw), log=lambda *_: None)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        logs = []

        def swap_a_node():  # it holds a stage: every node holds one
            time.sleep(1.0)
            cluster.remove_node(nodes[-1])
            cluster.add_node(num_cpus=1, num_gpus=1)  # the replacement the autoscaler would start

        hit, removed = run_meanwhile(
            lambda: run(small_job(model, tmp_path / "hit", address=cluster.address, **kw), log=logs.append),
            lambda: ray.available_resources().get("GPU", 0) == 0,  # all three GPUs reserved for the stages
            swap_a_node, within=120)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed and any("restarting the phase" in line for line in logs), logs
    assert hit["keep_map"] == calm["keep_map"]
    assert shard_bytes(tmp_path / "calm") == shard_bytes(tmp_path / "hit")


def test_driver_killed_after_select_then_resume(tiny_models, tmp_path, ray_local):
    """The driver process is SIGKILLed right after the select phase is marked done (MOP_RAY_FAULT_DRIVER_EXIT);
    nothing appears at --out; the same command with --resume reuses calibration, records and keep-map from the
    manifest, writes, and gives the checkpoint an undisturbed run with the same seed gives. The drivers join
    the test session's running Ray through --address, as a job's driver joins its cluster."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from mop_ray.cli import main

    model = tiny_models["mixtral"]
    args = ["prune", "--model", str(model), "--method", "reap", "--keep", "4", "--tokens", "256", "--seq-len", "32",
            "--sample", "10000", "--micro-batch", "2", "--seed", "0", "--max-shard-size", "100KB"]
    assert main([*args, "--out", str(tmp_path / "calm")]) == 0  # the undisturbed reference, in-process
    out, run_dir = tmp_path / "hit", tmp_path / "hit-run"
    cmd = [str(Path(sys.executable).parent / "mop-ray"), *args, "--out", str(out), "--run-dir", str(run_dir),
           "--address", ray_local.get_runtime_context().gcs_address]

    def driver(env, *flags):
        p = subprocess.Popen([*cmd, *flags], env={**os.environ, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        try:
            text, _ = p.communicate(timeout=240)
        finally:
            p.kill()
            p.wait()
        return p.returncode, text

    rc, text = driver({"MOP_RAY_FAULT_DRIVER_EXIT": "after_select"})
    assert rc == -signal.SIGKILL, text[-3000:]
    assert "select: reap kept 4 of 8 experts" in text and "wrote" not in text, text[-3000:]
    phases = json.loads((run_dir / "manifest.json").read_text())["phases"]
    assert set(phases) == {"calibrate", "observe", "select"}, phases  # killed before write
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hit")]  # no partial output

    rc, text = driver({}, "--resume")
    assert rc == 0, text[-3000:]
    for line in ("calibrate: reusing", "observe: all layers recorded, skipping",
                 "select: reusing the keep-map in the manifest", f"wrote {out}"):
        assert line in text, (line, text[-3000:])
    phases = json.loads((run_dir / "manifest.json").read_text())["phases"]
    assert phases["write"]["out"] == str(out) and phases["verify"] == {"ok": True}
    assert shard_bytes(tmp_path / "calm") == shard_bytes(out)  # byte-identical shards, same names
    calm_info, hit_info = (json.loads((d / "pruning.json").read_text()) for d in (tmp_path / "calm", out))
    assert hit_info["keep_map"] == calm_info["keep_map"]
    assert len(set(shard_bytes(out)[0].values())) > 1  # several shards were compared


def test_driver_killed_between_rounds_resumes_at_the_next_round(tiny_models, tmp_path, ray_local):
    """Stages in rounds (three, one at a time): the driver is SIGKILLed once the first round has saved its hidden
    states, records and choices; --resume runs the last two rounds only (from the saved hidden states) and gives
    the records and checkpoint of an undisturbed run."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from mop_ray.cli import main

    model = tiny_models["mixtral"]
    args = ["prune", "--model", str(model), "--method", "reap", "--keep", "4", "--tokens", "256", "--seq-len", "32",
            "--sample", "10000", "--micro-batch", "2", "--seed", "0", "--max-shard-size", "100KB",
            "--stages", "3", "--stages-at-once", "1"]
    assert main([*args, "--out", str(tmp_path / "calm")]) == 0
    out, run_dir = tmp_path / "hit", tmp_path / "hit-run"
    cmd = [str(Path(sys.executable).parent / "mop-ray"), *args, "--out", str(out), "--run-dir", str(run_dir),
           "--address", ray_local.get_runtime_context().gcs_address]

    def driver(env, *flags):
        p = subprocess.run([*cmd, *flags], env={**os.environ, **env}, capture_output=True, text=True, timeout=240)
        return p.returncode, p.stdout + p.stderr

    rc, text = driver({"MOP_RAY_FAULT_DRIVER_EXIT": "after_round"})
    assert rc == -signal.SIGKILL, text[-3000:]
    phases = json.loads((run_dir / "manifest.json").read_text())["phases"]
    assert set(phases) == {"calibrate", "observe_rounds"} and phases["observe_rounds"]["stages_done"] == 1, phases
    assert sorted(p.name for p in (run_dir / "rounds" / "stages-done-1").iterdir())[0] == "mb-00000.safetensors"

    rc, text = driver({}, "--resume")
    assert rc == 0, text[-3000:]
    assert "observe: resuming after stage 0 (layers 0-0 recorded, selected)" in text, text[-3000:]
    assert "layers 0-0 on 1 stage(s)" not in text and "observe: round 2 of 2: layers 2-2" in text, text[-3000:]
    phases = json.loads((run_dir / "manifest.json").read_text())["phases"]
    assert phases["select"]["in"] == "stages" and not (run_dir / "rounds").exists()
    assert_same_stats(tmp_path / "calm.run", run_dir, model, tokens=256)
    assert shard_bytes(tmp_path / "calm") == shard_bytes(out)

"""Three simulated nodes with one fake GPU each: stages land on different nodes and give the single-node result."""

from __future__ import annotations

import json

import numpy as np

from actors.coordinator import run
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.observe.records import STAT_FIELDS, read_stats

from conftest import run_meanwhile, small_job


def test_three_nodes_with_fake_gpus_match_a_single_process(tiny_models, tmp_path, ray_local):
    import ray
    from ray.cluster_utils import Cluster

    model = tiny_models["qwen3_moe"]
    single = run(small_job(model, tmp_path / "single", stages=1), log=lambda *_: None)
    ray.shutdown()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        multi = run(small_job(model, tmp_path / "multi", stages=3, address=cluster.address), log=lambda *_: None)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()

    placement = json.loads((tmp_path / "multi.run" / "manifest.json").read_text())["phases"]["observe"]["placement"]
    assert len(nodes) == 3
    assert len({p["node"] for p in placement}) == 3  # one stage per node
    assert all(len(p["gpus"]) == 1 and p["device"] == "cpu" for p in placement)  # fake GPU assigned, CPU compute
    assert multi["keep_map"] == single["keep_map"]
    for layer in Checkpoint(model).moe_layers:
        a, b = read_stats(tmp_path / "single.run", layer), read_stats(tmp_path / "multi.run", layer)
        for f in STAT_FIELDS:
            np.testing.assert_allclose(a.by_source[f], b.by_source[f], rtol=1e-9, atol=1e-12)
    assert (tmp_path / "multi" / "config.json").exists()


def test_more_stages_than_gpus_run_in_rounds_across_nodes(tiny_models, tmp_path, ray_local):
    """Two nodes with one fake GPU each and three stages: the stages run in rounds of two (the first round's two
    stages a pipeline across the nodes), each on a GPU, and give the single-process result — also when both nodes
    are lost in round 2 (its stage stopped at micro-batch 3, MOP_RAY_FAULT_HANG) and two replacements join, as an
    autoscaler starts them: round 1's hidden states, which were in the lost nodes' object stores, come from the
    copy saved in the run directory and only round 2 runs again."""
    import ray
    from ray.cluster_utils import Cluster

    model = tiny_models["qwen3_moe"]
    kw = dict(tokens=32 * 32, micro_batch=1)
    single = run(small_job(model, tmp_path / "single", stages=1, **kw), log=lambda *_: None)
    ray.shutdown()

    marker = tmp_path / "hang.marker"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        logs = []
        manifest = tmp_path / "rounds.run" / "manifest.json"
        fault = {"fault_env": {"MOP_RAY_FAULT_HANG": f"2:3:{marker}"}}  # round 2's stage stops at micro-batch 3

        def both_nodes_replaced():
            for node in nodes:
                cluster.remove_node(node)
            for _ in nodes:
                cluster.add_node(num_cpus=1, num_gpus=1)

        rounds, replaced = run_meanwhile(
            lambda: run(small_job(model, tmp_path / "rounds", stages=3, address=cluster.address, extra=fault, **kw),
                        log=logs.append),
            lambda: marker.exists() and manifest.exists()  # round 2 stopped, round 1's boundary saved
            and "observe_rounds" in json.loads(manifest.read_text())["phases"],
            both_nodes_replaced)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert replaced and any("round 2: a stage was lost" in m for m in logs), logs
    assert any(m.startswith("observe: round 2: its inputs from ") for m in logs), logs
    assert [sum(m.startswith(f"observe: round {r} of 2") for m in logs) for r in (1, 2)] == [1, 2]
    observe = json.loads((tmp_path / "rounds.run" / "manifest.json").read_text())["phases"]["observe"]
    assert observe["rounds"] == 2 and [p["layers"] for p in observe["placement"]] == [[0], [1], [2]]
    assert all(len(p["gpus"]) == 1 for p in observe["placement"])  # every stage on a (fake) GPU, none on the CPU
    assert len({p["node"] for p in observe["placement"][:2]}) == 2  # the first round: one stage per node
    assert any("in 2 rounds of 2" in m for m in logs)
    assert rounds["keep_map"] == single["keep_map"]
    for layer in Checkpoint(model).moe_layers:
        a, b = read_stats(tmp_path / "single.run", layer), read_stats(tmp_path / "rounds.run", layer)
        assert a.n_tokens == b.n_tokens == 32 * 32  # no micro-batch counted twice
        for f in STAT_FIELDS:
            np.testing.assert_allclose(a.by_source[f], b.by_source[f], rtol=1e-9, atol=1e-12)

"""Autoscaling from zero GPU nodes: a CPU-only head whose autoscaler (Ray's fake multinode provider) may start
up to two {"CPU": 2, "GPU": 1} worker nodes. The coordinator's placement group of GPU bundles (--stage-gpus 1)
is pending until the autoscaler has started the nodes; the stages run there and the job writes a valid
checkpoint.

`ray.cluster_utils.AutoscalingCluster` cannot be used as is with Ray 2.60: the wheel does not ship
`ray/autoscaler/_private/fake_multi_node/example.yaml`, which its constructor reads (FileNotFoundError) and
which the autoscaler itself loads as the defaults of a `type: fake_multinode` provider (the monitor dies with
the same FileNotFoundError); and its start()/shutdown() run `ray stop --force`, which kills every Ray process
on the machine. So this test builds the same configuration (the Ray repository's example.yaml with our node
types, as AutoscalingCluster._generate_config does), names the same provider class as an `external` provider
module (whose defaults need no file), and starts the head as AutoscalingCluster.start(autoscaler_v2=True)
does (`ray start --head --autoscaling-config=...`, RAY_FAKE_CLUSTER=1, AUTOSCALER_UPDATE_INTERVAL_S=1,
RAY_enable_autoscaler_v2=1: `ray up` uses autoscaler v2 by default in 2.60), on private ports and temp dir.
"""

from __future__ import annotations

import json
import threading

from actors.coordinator import run
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.verify import verify

from conftest import small_job
from ray_head import PrivateHead

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # fake_multi_node.node_provider's


def fake_multinode_config(gcs_address: str, worker_node_types: dict, head_resources: dict) -> dict:
    """ray/autoscaler/_private/fake_multi_node/example.yaml with our node types (AutoscalingCluster's recipe)."""
    return {
        "cluster_name": "fake_multinode", "max_workers": 8,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "available_node_types": {**worker_node_types, "ray.head.default": {
            "resources": head_resources, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def remove_pending_placement_groups():
    """Unblock the coordinator's placement-group wait when no node came (its wait then fails)."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if info["state"] == "PENDING":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def test_autoscaler_starts_gpu_nodes_for_the_stages(tiny_models, tmp_path):
    import shutil

    import ray

    ray.shutdown()  # this process joins the autoscaling cluster instead (the next ray_local user starts a new one)
    workers = {"gpu_node": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100 * 2**20},
                            "node_config": {}, "min_workers": 0, "max_workers": 2}}
    head = PrivateHead(
        num_cpus=1, num_gpus=0, dashboard=False, extra_args=("--object-store-memory", str(100 * 2**20)),
        autoscaling_config=lambda gcs: fake_multinode_config(gcs, workers, {"CPU": 1, "GPU": 0}),
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
             "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
    try:
        head.start()
        ray.init(address=head.address, log_to_driver=False)
        alive = lambda: [n for n in ray.nodes() if n["Alive"]]  # noqa: E731
        assert len(alive()) == 1 and ray.cluster_resources().get("GPU", 0) == 0  # no GPU anywhere yet
        logs = []
        watchdog = threading.Timer(180, remove_pending_placement_groups)  # fail in minutes, not after the 10 min wait
        watchdog.start()
        try:
            res = run(small_job(tiny_models["mixtral"], tmp_path / "out", stages=2, stage_gpus=1, address=head.address),
                      log=logs.append)
        finally:
            watchdog.cancel()
        nodes = alive()
        gpus = ray.cluster_resources().get("GPU", 0)
    finally:
        ray.shutdown()
        head.stop(keep_temp=True)
        monitor = head.temp_dir / "session_latest" / "logs" / "monitor.log"
        monitor_log = monitor.read_text(errors="replace") if monitor.exists() else ""
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    assert len(nodes) == 3 and gpus == 2, (nodes, monitor_log[-3000:])  # the autoscaler added two GPU nodes
    assert "Adding 2 node(s) of type gpu_node." in monitor_log, monitor_log[-3000:]
    launched = {"f" * 51 + f"{i:05d}" for i in (1, 2)}  # the ids FakeMultiNodeProvider gives the nodes it starts
    assert {n["NodeID"] for n in nodes} == launched | {FAKE_HEAD_NODE_ID}
    placement = json.loads((tmp_path / "out.run" / "manifest.json").read_text())["phases"]["observe"]["placement"]
    assert {p["node"] for p in placement} == launched, placement  # one stage on each new node
    assert all(len(p["gpus"]) == 1 and p["device"] == "cpu" for p in placement)  # fake GPU assigned, CPU compute
    out = Checkpoint(tmp_path / "out")
    assert out.num_experts == 4 and sorted(res["keep_map"]) == out.moe_layers
    verify(tmp_path / "out")

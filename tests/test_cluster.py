"""Cluster deployment: cluster.yaml passes Ray's own validation (and a typo fails it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    gpu = cfg["available_node_types"]["gpu_8x"]
    assert gpu["min_workers"] == 0 and cfg["idle_timeout_minutes"] > 0
    broken = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken["available_node_types"]["gpu_8x"]["min_worker"] = 0  # a typo must be caught
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))

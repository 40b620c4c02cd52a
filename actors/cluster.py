"""Ray bootstrapping: connect to ``--address``/``RAY_ADDRESS`` or start a local instance; size the stages."""

from __future__ import annotations

import os

import ray

from mop_ray.errors import MopError


def connect(address: str | None = None) -> None:
    """Join a running cluster when an address is given (or RAY_ADDRESS is set); else start a local Ray.

    A local instance binds to loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and has no dashboard.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(include_dashboard=False, log_to_driver=True)
    except ConnectionError as e:
        raise MopError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def default_stages(num_layers: int) -> int:
    """One stage per GPU of the cluster (at most one per layer); one CPU stage when there is no GPU."""
    return max(1, min(cluster_gpus(), num_layers))

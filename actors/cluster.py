"""Ray bootstrapping: connect to ``--address``/``RAY_ADDRESS`` or start a local instance; size the stages."""

from __future__ import annotations

import os
import socket

import ray

from mop_ray.bytecode import use_bytecode_cache
from mop_ray.errors import MopError

_STARTED_HERE = {"local": False}  # True when connect() started a private local Ray (no autoscaler behind it)


def started_locally() -> bool:
    return _STARTED_HERE["local"]


def connect(address: str | None = None) -> None:
    """Join a running cluster when an address is given (or RAY_ADDRESS is set); else start a local Ray.

    A local instance binds to loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and has no dashboard. Where the
    installed packages have no compiled bytecode and cannot take it, the driver and a local Ray's workers cache it
    under ~/.cache/mop-ray/pycache (``mop_ray.bytecode``).
    """
    if ray.is_initialized():
        return
    check_reachable(address)
    use_bytecode_cache()  # before the driver's transformers import and the local workers' start: they inherit it
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # "local": a new instance, never the latest `ray start` cluster of this machine that a bare ray.init()
            # would join (another user's or test's; --address auto joins it on purpose)
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
            _STARTED_HERE["local"] = True
    except ConnectionError as e:
        raise MopError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None


def check_reachable(address: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail in seconds when ``--address``/``RAY_ADDRESS`` names a host:port nobody listens on.

    ``ray.init(address=...)`` retries an unreachable GCS for minutes (about 40 s per try, many tries) before
    it gives up; a TCP connect answers at once (refused) or within ``timeout_s`` (filtered/unroutable).
    ``auto``, ``local`` and ``http(s)://`` addresses are left to Ray.
    """
    if ray.is_initialized():
        return
    given = bool(address)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    target = address.strip()
    if target in ("auto", "local") or target.startswith(("http://", "https://")):
        return
    target = target.removeprefix("ray://").rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # no explicit port: let Ray parse it
    host = host.strip("[]") or "127.0.0.1"
    client = address.strip().startswith("ray://")
    expected = ("the Ray client server of a running head (ray://HOST:10001)" if client else
                "the GCS address of a running head (HOST:PORT; 6379 unless `ray start --head --port` chose another)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = (f"no answer within {timeout_s:g}s" if isinstance(e, socket.timeout)
                  else (e.strerror or type(e).__name__).lower())
        label = f"--address {address}" if given else f"RAY_ADDRESS={address}"
        raise MopError(f"{label}: no Ray cluster at {host}:{port} ({reason}); expected {expected}") from None


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def default_stages(num_layers: int) -> int:
    """One stage per GPU of the cluster (at most one per layer); one CPU stage when there is no GPU."""
    return max(1, min(cluster_gpus(), num_layers))

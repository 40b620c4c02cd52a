"""A private `ray start --head` for tests: loopback only, its own temp dir and free ports, and a stop() that
kills exactly the processes it started.

Why not `ray stop` / `ray.cluster_utils.AutoscalingCluster`: `ray stop` (which AutoscalingCluster.start()
and .shutdown() call with --force) kills every Ray process on the machine, including other users' clusters
and this test session's own `ray.init`. And every port is chosen here because two heads on one machine
collide on Ray's fixed defaults: the dashboard agent's HTTP port 52365 most of all. A head whose agent
cannot bind it stays up, but `ray job submit` then fails with "No available agent to submit job" (the
agent logs "Agent port #52365 failed to bind after 6 attempts" in dashboard_agent.log).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: ray, mop-ray, python

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(**extra: str) -> dict:
    """The environment for `ray` CLI calls and the head: the venv first on PATH, loopback, offline HF."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_ENV)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class PrivateHead:
    def __init__(self, num_cpus: float = 2, num_gpus: int = 0, dashboard: bool = True, env: dict | None = None,
                 autoscaling_config=None, extra_args: tuple = ()):
        """``autoscaling_config``: a cluster config dict, or a function of the head's GCS address returning one."""
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))  # short: Unix socket paths are <= 107 bytes
        (self.gcs_port, self.dashboard_port, self.agent_port, self.agent_grpc_port, self.metrics_port,
         self.runtime_env_port, self.client_port, self.node_manager_port, self.object_manager_port) = free_ports(9)
        self.env = ray_env(**(env or {}))
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
               "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--temp-dir", str(self.temp_dir),
               "--disable-usage-stats", "--include-dashboard", "true" if dashboard else "false",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(self.agent_port),
               "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
               "--metrics-export-port", str(self.metrics_port), "--runtime-env-agent-port", str(self.runtime_env_port),
               "--ray-client-server-port", str(self.client_port), "--node-manager-port", str(self.node_manager_port),
               "--object-manager-port", str(self.object_manager_port)]
        if autoscaling_config is not None:
            if callable(autoscaling_config):
                autoscaling_config = autoscaling_config(self.address)
            cfg = self.temp_dir / "autoscaling.json"
            cfg.write_text(json.dumps(autoscaling_config))
            cmd.append(f"--autoscaling-config={cfg}")
        self.cmd = cmd + list(extra_args)

    def start(self, timeout_s: float = 120) -> "PrivateHead":
        # A session of its own: every daemon `ray start` leaves behind keeps this process group id.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.pgid = self.proc.pid
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        if self.proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({self.proc.returncode}):\n{out[-3000:]}")
        return self

    def processes(self):
        """This head's processes: its process group (gcs, raylet, dashboard, monitor, fake nodes the
        autoscaler started) and all their descendants (workers, job drivers, which get groups of their own)."""
        import psutil

        found = {}
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == self.pgid:
                    found[p.pid] = p
            except (ProcessLookupError, psutil.Error, OSError):
                continue
        for p in list(found.values()):
            try:
                for c in p.children(recursive=True):
                    found.setdefault(c.pid, c)
            except psutil.Error:
                continue
        return list(found.values())

    def log_tail(self, name: str, n: int = 4000) -> str:
        path = self.temp_dir / "session_latest" / "logs" / name
        return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"

    def stop(self, keep_temp: bool = False) -> None:
        import psutil

        if self.pgid is None:
            if not keep_temp:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            return
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.pgid = None
        if not keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - not ready yet
            last = e
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s (last error: {last!r})")

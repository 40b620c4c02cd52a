"""`ray job submit` end to end, with token authentication as Ray >= 2.61 clusters use by default.

A real `ray start --head` (loopback, dashboard on, private temp dir and ports; RAY_AUTH_MODE=token with a
RAY_AUTH_TOKEN) and `ray job submit --working-dir DIR -- mop-ray prune --config job.yaml`. A client
without the token is refused. The job's driver joins that cluster through the RAY_ADDRESS the job server
sets, with the auth mode and token it inherits from the head. The pruned checkpoint appears at --out.

The previous "No available agent to submit job" failure came from the head's dashboard agent not being able
to bind its fixed default port 52365, already taken by another Ray head on the machine; PrivateHead gives
every port explicitly (see tests/ray_head.py).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import uuid

import pytest
import yaml

from mop_ray.checkpoint.reader import Checkpoint
from ray_head import BIN, PrivateHead, ray_env, wait_for


def ray_cli(head, *args, env=None, timeout=60):
    return subprocess.run([str(BIN / "ray"), *args], env=env or head.env, capture_output=True, text=True,
                          timeout=timeout)


def agent_ready(head) -> bool:
    """The head's dashboard agent answers (the job server hands submissions to it)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{head.agent_port}/api/local_raylet_healthz", timeout=2) as r:
        return r.status == 200


@pytest.fixture
def head():
    h = PrivateHead(num_cpus=2, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}).start()
    try:
        wait_for(lambda: agent_ready(h), 60, what="dashboard agent")
        yield h
    finally:
        h.stop()


def test_ray_job_submit_prunes(tiny_models, tmp_path, head):
    work, out = tmp_path / "workdir", tmp_path / "out"
    work.mkdir()
    (work / "job.yaml").write_text(yaml.safe_dump({  # --model/--out absolute: the job runs in a copy of work/
        "model": str(tiny_models["mixtral"]), "out": str(out), "method": "reap", "keep": 4, "tokens": 8 * 32,
        "seq-len": 32, "sample": 10_000, "micro-batch": 2, "seed": 0}))
    sid = f"mop-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    submit = ["job", "submit", "--address", head.dashboard_url, "--working-dir", str(work),
              "--runtime-env-json", json.dumps(runtime_env)]
    entrypoint = ["--", "mop-ray", "prune", "--config", "job.yaml"]

    refused = ray_cli(head, *submit, *entrypoint, env=ray_env(RAY_AUTH_MODE="disabled"))  # the client has no token
    assert refused.returncode != 0
    assert "Authentication required: Unauthorized: Missing authentication token" in refused.stderr, refused.stderr[-2000:]
    assert not out.exists()

    done = ray_cli(head, *submit, "--submission-id", sid, *entrypoint, timeout=240)  # waits, tailing the job log
    assert done.returncode == 0, (f"{done.stdout[-4000:]}\n{done.stderr[-3000:]}\n--- dashboard_agent.log\n"
                                  f"{head.log_tail('dashboard_agent.log')}")
    status = ray_cli(head, "job", "status", "--address", head.dashboard_url, sid)
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr  # SUCCEEDED
    logs = ray_cli(head, "job", "logs", "--address", head.dashboard_url, sid).stdout
    assert f"Connecting to existing Ray cluster at address: {head.address}" in logs, logs[-4000:]  # joined this head
    n_moe = len(Checkpoint(tiny_models["mixtral"]).moe_layers)
    for line in ("calibrate: 8 blocks x 32 tokens", "observe: 256 tokens through 1 stage(s)",
                 f"select: reap kept 4 of 8 experts in {n_moe} layers", f"wrote {out}: "):
        assert line in logs, (line, logs[-4000:])

    ckpt = Checkpoint(out)
    assert ckpt.num_experts == 4
    pruning = json.loads((out / "pruning.json").read_text())
    assert sorted(map(int, pruning["keep_map"])) == ckpt.moe_layers
    assert all(len(v) == 4 for v in pruning["keep_map"].values())
    manifest = json.loads((tmp_path / "out.run" / "manifest.json").read_text())
    assert {"calibrate", "observe", "select", "write", "verify"} <= set(manifest["phases"])

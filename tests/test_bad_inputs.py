"""Bad input: one clear line on stderr, exit status 2, and nothing written (or an existing --out untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mop_ray.checkpoint.writer import write_pruned
from mop_ray.cli import main
from mop_ray.errors import MopError


def copy_model(tiny_models, family, tmp_path):
    dst = tmp_path / f"src-{family}"
    shutil.copytree(tiny_models[family], dst)
    return dst


def run_fails(capsys, tmp_path, args, expect):
    out = tmp_path / "out"
    rc = main(["prune", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mop-ray: error: "), err
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return lines[0]


def write_keep(tmp_path, keep):
    path = tmp_path / "keep.json"
    path.write_text(json.dumps(keep))
    return ["--keep-map", str(path)]


def test_missing_index_and_shards(tiny_models, tmp_path, capsys):
    src = copy_model(tiny_models, "mixtral", tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[2]
    shard.unlink()
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], f"shard {shard.name} is listed")
    (src / "model.safetensors.index.json").unlink()
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "expected model.safetensors.index.json")


def test_corrupt_safetensors_header(tiny_models, tmp_path, capsys):
    src = copy_model(tiny_models, "olmoe", tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "corrupt safetensors header")
    shard.write_bytes(bytes(data[:7]))
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "corrupt safetensors file")


def test_truncated_shard(tiny_models, tmp_path, capsys):
    src = copy_model(tiny_models, "olmoe", tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "corrupt safetensors header")


def test_unsupported_family(tiny_models, tmp_path, capsys):
    src = copy_model(tiny_models, "mixtral", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    line = run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "unsupported model family")
    assert "mixtral" in line and "deepseek_v3" in line


def test_remote_code_is_never_run(tiny_models, tmp_path, capsys):
    """A config asking for repository code (auto_map, trust_remote_code models) is never imported: an unknown
    model_type is refused saying so; a known one (DeepSeek-V3's release has auto_map) uses transformers' class."""
    src = copy_model(tiny_models, "deepseek_v3", tmp_path)
    marker = tmp_path / "remote-code-ran"
    (src / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilForCausalLM: pass\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "ok"), "--keep", "4"]) == 0
    cfg.update(model_type="evil_moe", architectures=["EvilForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    line = run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "unsupported model family")
    assert "asks for repository code (auto_map), which mop-ray never imports or runs" in line
    assert not marker.exists()


@pytest.mark.parametrize("keep,expect", [(8, "must be below the 8 experts"), (9, "must be below"),
                                         (1, "at least the router top-k")])
def test_bad_expert_count(tiny_models, tmp_path, capsys, keep, expect):
    run_fails(capsys, tmp_path, ["--model", str(tiny_models["qwen3_moe"]), "--keep", str(keep)], expect)


@pytest.mark.parametrize("keep,expect", [
    ({"0": [0, 1, 1, 2], "1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}, "duplicate expert ids [1]"),
    ({"0": [0, 1, 2, 8], "1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}, "out of range [0, 8)"),
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}, "no entry for MoE layers 2"),
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3], "2": [0, 1, 2, 3], "7": [0, 1, 2, 3]}, "layer 7 is not an MoE layer"),
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2], "2": [0, 1, 2, 3]}, "counts differ across layers"),
    ({"0": ["a"], "1": [0], "2": [0]}, "expected a list of integer expert ids"),
])
def test_bad_keep_maps(tiny_models, tmp_path, capsys, keep, expect):
    run_fails(capsys, tmp_path, ["--model", str(tiny_models["mixtral"]), *write_keep(tmp_path, keep)], expect)


def test_bad_waves_fail_before_anything_is_written(tiny_models, tmp_path, capsys):
    run_fails(capsys, tmp_path, ["--model", str(tiny_models["mixtral"]), "--method", "reap", "--keep", "4",
                                 "--waves", "0"], "--waves 0: expected at least 1")
    assert not (tmp_path / "out.run").exists()


def test_keep_map_file_problems(tiny_models, tmp_path, capsys):
    model = ["--model", str(tiny_models["mixtral"])]
    run_fails(capsys, tmp_path, [*model, "--keep-map", str(tmp_path / "nope.json")], "no such file")
    (tmp_path / "bad.json").write_text("{not json")
    run_fails(capsys, tmp_path, [*model, "--keep-map", str(tmp_path / "bad.json")], "not valid JSON")


def test_deepseek_group_violations(tiny_models, tmp_path, capsys):
    for fam in ("deepseek_v2", "deepseek_v3"):
        model = ["--model", str(tiny_models[fam])]
        run_fails(capsys, tmp_path, [*model, "--keep", "3"], "multiple of n_group=2")
        unbalanced = {"1": [0, 1, 2, 4], "2": [0, 1, 4, 5]}  # layer 1 keeps 3 + 1 in its two groups
        run_fails(capsys, tmp_path, [*model, *write_keep(tmp_path, unbalanced)], "keeps [3, 1] experts")
    run_fails(capsys, tmp_path, ["--model", str(tiny_models["deepseek_v3"]), "--keep", "2"], "needs >= 2")


def test_non_empty_out_is_left_alone(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = main(["prune", "--model", str(tiny_models["mixtral"]), "--out", str(out), "--keep", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty; pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_pickle_weights_are_refused_not_unpickled(tiny_models, tmp_path, capsys):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(tiny_models["mixtral"] / "config.json", src)
    # A pickle that would create a file if it were ever loaded.
    marker = tmp_path / "unpickled"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (src / "pytorch_model.bin").write_bytes(payload)
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "never unpickles")
    assert not marker.exists()


def test_failure_while_writing_leaves_no_partial_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    keep = {str(i): [0, 1, 2, 3] for i in range(3)}

    def broken_writer(directory, plans):
        (directory / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise MopError("worker lost")

    with pytest.raises(MopError, match="worker lost"):
        write_pruned(tiny_models["mixtral"], out, keep, shard_writer=broken_writer)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_keep_argument(tiny_models, tmp_path, capsys):
    run_fails(capsys, tmp_path, ["--model", str(tiny_models["mixtral"])], "pass --keep R")


def test_model_dir_missing(tmp_path, capsys):
    run_fails(capsys, tmp_path, ["--model", str(tmp_path / "nothing"), "--keep", "4"], "expected a model directory")


def test_missing_or_corrupt_config(tiny_models, tmp_path, capsys):
    src = copy_model(tiny_models, "mixtral", tmp_path)
    (src / "config.json").write_text("{not json")
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "config.json: not valid JSON")
    (src / "config.json").unlink()
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "no config.json")


def test_output_path_under_a_file(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["prune", "--model", str(tiny_models["mixtral"]), "--out", str(blocker / "sub" / "out"), "--keep", "4"])
    assert rc == 2 and "cannot create its parent directory" in capsys.readouterr().err


def test_header_lying_about_sizes(tiny_models, tmp_path, capsys):
    import struct

    src = copy_model(tiny_models, "olmoe", tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]  # claims more bytes than its offsets hold
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    run_fails(capsys, tmp_path, ["--model", str(src), "--keep", "4"], "corrupt safetensors header")


def test_calibration_problems_fail_before_writing(tiny_models, tmp_path, ray_local):
    from actors.coordinator import run
    from conftest import small_job

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(MopError, match="empty.txt|blocks of"):
        run(small_job(tiny_models["mixtral"], tmp_path / "o", calib=str(empty)), log=lambda *_: None)
    src = copy_model(tiny_models, "mixtral", tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    with pytest.raises(MopError, match="cannot load the tokenizer"):
        run(small_job(src, tmp_path / "o"), log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_unreachable_address_fails_fast(tiny_models, tmp_path):
    """`--address` naming a port nobody listens on: one line, exit 2, in seconds (ray.init alone retries the GCS
    for minutes), and nothing written: no --out, no run dir. A real `mop-ray` process, as a user runs it."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    p = subprocess.run([str(Path(sys.executable).parent / "mop-ray"), "prune", "--model", str(tiny_models["mixtral"]),
                        "--out", str(out), "--method", "reap", "--keep", "4", "--address", f"127.0.0.1:{port}"],
                       env=env, capture_output=True, text=True, timeout=120)
    seconds = time.time() - t0
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0] == (f"mop-ray: error: --address 127.0.0.1:{port}: no Ray cluster at 127.0.0.1:{port} (connection "
                        "refused); expected the GCS address of a running head (HOST:PORT; 6379 unless `ray start --head "
                        "--port` chose another)"), lines[0]
    assert seconds < 60, seconds  # the process' imports, then an immediate refusal (not minutes of GCS retries)
    assert not out.exists() and not (tmp_path / "out.run").exists() and list(tmp_path.iterdir()) == []


def test_stage_gpus_without_gpus_on_a_local_ray_fails_at_once(tiny_models, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "mop_ray.cli", "prune", "--model", str(tiny_models["mixtral"]),
                           "--out", str(out), "--method", "reap", "--keep", "4", "--tokens", "256", "--seq-len", "32",
                           "--stages", "2", "--stage-gpus", "1"],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the stages need 2 GPUs but this machine's Ray has 0 and no autoscaler" in proc.stderr
    assert not out.exists() and not Path(str(out) + ".run").exists()


def test_gpus_that_never_come_fail_after_the_placement_wait(tiny_models, tmp_path, ray_local, monkeypatch):
    """A cluster (not started by mop-ray: an autoscaler may add GPUs) that never gives the stages their GPUs: after
    MOP_RAY_PLACEMENT_WAIT_S one line naming the wait, and the request is withdrawn (an autoscaler would otherwise
    go on starting nodes for it)."""
    from ray.util.placement_group import placement_group_table

    from actors.coordinator import run
    from conftest import small_job

    monkeypatch.setattr("actors.coordinator.PLACEMENT_WAIT_S", 2)
    with pytest.raises(MopError, match=r"could not reserve 1 x \{'GPU': 1, 'CPU': 0.1\} for the stages within 2 s "
                                       r"\(MOP_RAY_PLACEMENT_WAIT_S\)"):
        run(small_job(tiny_models["mixtral"], tmp_path / "o", stage_gpus=1), log=lambda *_: None)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    assert not (tmp_path / "o").exists()


def test_sample_too_large_for_selection_fails_before_calibrating(tiny_models, tmp_path, capsys, monkeypatch):
    """The per-layer products of --sample are sized up front: over the budget, one line and nothing written."""
    monkeypatch.setattr("actors.coordinator.SELECT_MEMORY_GB", 0.001)
    out = tmp_path / "o"
    rc = main(["prune", "--model", str(tiny_models["deepseek_v3"]), "--out", str(out), "--method", "mop",
               "--keep", "4", "--tokens", "4096", "--seq-len", "32", "--sample", "4096"])
    err = capsys.readouterr().err
    assert rc == 2 and "--sample 4096: selecting with mop needs" in err and "use --sample" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not Path(str(out) + ".run").exists()


def test_a_disk_without_room_for_the_records_fails_before_anything_starts(tiny_models, tmp_path, capsys, monkeypatch):
    """Records and output are sized up front against the free space (a full disk hours into observe loses the
    run): too little, one line, nothing written. (Every other run of the suite passes the check for real.)"""
    from collections import namedtuple

    from actors.disk_space import records_bytes
    from actors.coordinator import PruneJob
    from mop_ray.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(tiny_models["mixtral"])
    job = PruneJob(model=str(ckpt.path), out=str(tmp_path / "o"), method="frequency", keep=4, tokens=4096, seq_len=32,
                   sample=4096)
    rows, need = records_bytes(job, ckpt, ckpt.moe_layers)
    assert rows == 4096 and need > 0
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("actors.disk_space.shutil.disk_usage", lambda p: usage(10**12, 0, need // 2))
    out = tmp_path / "o"
    rc = main(["prune", "--model", str(ckpt.path), "--out", str(out), "--method", "frequency", "--keep", "4",
               "--tokens", "4096", "--seq-len", "32", "--sample", "4096"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the records of {len(ckpt.moe_layers)} MoE layers (4096 sampled rows each, --sample)" in err
    assert "lower --sample or use a larger disk" in err
    assert not out.exists() and not Path(str(out) + ".run").exists()


def test_a_resumed_run_needs_room_only_for_the_layers_not_yet_recorded(tiny_models, tmp_path, monkeypatch):
    """... and records a new run removes before it starts count as free."""
    from collections import namedtuple

    from actors.coordinator import PruneJob
    from actors.disk_space import check_disk_space, records_bytes
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.checkpoint.writer import plan_tensors
    from mop_ray.observe.records import layer_dir

    ckpt = Checkpoint(tiny_models["qwen3_moe"])
    job = PruneJob(model=str(ckpt.path), out=str(tmp_path / "o"), method="frequency", keep=4, tokens=4096, seq_len=32,
                   sample=4096, resume=True)
    for i in ckpt.moe_layers:  # every layer's sample on disk (a file that exists is complete)
        layer_dir(job.run_path, i).mkdir(parents=True)
        (layer_dir(job.run_path, i) / "sample.arrow").write_bytes(b"")
    output = sum(t.nbytes for t in plan_tensors(ckpt, {i: list(range(4)) for i in ckpt.moe_layers}))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("actors.disk_space.shutil.disk_usage", lambda p: usage(10**12, 0, int(output * 1.1)))
    check_disk_space(job, ckpt)  # room for the output: enough
    job.resume = False  # the same records would be written again
    with pytest.raises(MopError, match="the records of"):
        check_disk_space(job, ckpt)
    (job.run_path / "manifest.json").write_text("{}")  # an earlier run's: a new run removes its records first
    _, records = records_bytes(job, ckpt, ckpt.moe_layers)
    for i in ckpt.moe_layers:  # as large as the new ones (sparse files: their size is what counts)
        with open(layer_dir(job.run_path, i) / "sample.arrow", "wb") as f:
            f.truncate(records)
    assert check_disk_space(job, ckpt)[1] == output


def test_stages_in_rounds_need_room_for_the_hidden_states_they_hand_on(tiny_models, tmp_path, monkeypatch):
    """Rounds save the hidden states between them (two boundaries for a moment, [tokens, H] each); a disk with room
    for records and output but not for those fails up front, and an earlier run's boundaries count as free."""
    from collections import namedtuple

    from actors.coordinator import PruneJob
    from actors.disk_space import boundary_bytes, check_disk_space

    from mop_ray.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(tiny_models["mixtral"])
    job = PruneJob(model=str(ckpt.path), out=str(tmp_path / "o"), method="frequency", keep=4, tokens=4096, seq_len=32,
                   sample=1024)
    one = 4096 * int(ckpt.config["hidden_size"]) * 4  # the tiny model's float32
    assert [boundary_bytes(job, ckpt, rounds) for rounds in (1, 2, 5)] == [0, one, 2 * one]
    records, output = check_disk_space(job, ckpt)
    usage = namedtuple("usage", "total used free")
    free = int((records + output) * 1.06)  # room for records and output only
    monkeypatch.setattr("actors.disk_space.shutil.disk_usage", lambda p: usage(10**12, 0, free))
    assert check_disk_space(job, ckpt, rounds=1) == (records, output)
    with pytest.raises(MopError, match="the hidden states between its 3 rounds") as e:
        check_disk_space(job, ckpt, rounds=3)
    assert len(str(e.value).splitlines()) == 1
    saved = job.run_path / "rounds" / "stages-done-1" / "mb-00000.safetensors"  # an earlier run's boundary
    saved.parent.mkdir(parents=True)
    with open(saved, "wb") as f:
        f.truncate(3 * one)  # the margin: 5 % of everything
    assert check_disk_space(job, ckpt, rounds=3) == (records + 2 * one, output)  # a new run removes it first
    job.resume = True  # a resumed run keeps it
    with pytest.raises(MopError, match="between its 3 rounds"):
        check_disk_space(job, ckpt, rounds=3)


def test_a_disk_that_fills_up_during_the_run_is_one_line_not_a_traceback(tiny_models, tmp_path, capsys, monkeypatch):
    """Space is checked up front, but another writer can still fill the disk: "no space left", raised in a stage
    (a RayTaskError whose cause is the OSError) or here, is one line; any other error keeps its traceback."""
    import errno

    import ray.exceptions

    def raising(error):
        def run(job, log=print):
            raise error
        return run

    args = ["prune", "--model", str(tiny_models["mixtral"]), "--out", str(tmp_path / "o"), "--method", "mop",
            "--keep", "4"]
    full = OSError(errno.ENOSPC, "No space left on device")
    for error in (ray.exceptions.RayTaskError("LayerShardWorker.forward_wave", "Traceback ...", full), full):
        monkeypatch.setattr("actors.coordinator.run", raising(error))
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("mop-ray: error: no space left on a disk this run writes to") and "--sample" in err
    monkeypatch.setattr("actors.coordinator.run", raising(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output error"):
        main(args)

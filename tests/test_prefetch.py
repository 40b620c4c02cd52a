"""The page-cache prefetcher reads a stage's next layers within its byte window, in order, and stops when told."""

from __future__ import annotations

import time

from mop_ray.checkpoint.prefetch import Prefetcher, layer_ranges
from mop_ray.checkpoint.reader import Checkpoint


def _wait_for(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond() and time.time() < end:
        time.sleep(0.01)
    return cond()


def test_layer_ranges_cover_every_tensor_once(tiny_models):
    ckpt = Checkpoint(tiny_models["mixtral"])
    ranges = layer_ranges(ckpt, 1)
    assert sum(n for _, _, n in ranges) == sum(t.nbytes for t in ckpt.layer_tensors(1).values())
    assert ranges == sorted(ranges) and len(ranges) < len(ckpt.layer_tensors(1))  # adjacent tensors merged


def test_prefetch_stays_within_its_window_and_follows_the_loader(tiny_models):
    ckpt = Checkpoint(tiny_models["deepseek_v3"])
    layers = list(range(ckpt.num_layers))
    assert len(layers) >= 3
    probe = Prefetcher(ckpt, layers, window=0)  # 0: no thread
    sizes = probe.sizes
    pf = Prefetcher(ckpt, layers, window=sizes[1])  # one layer past the one loading
    try:
        assert _wait_for(lambda: pf.read_bytes == sizes[1])  # layer 0 is the loader's own; layer 1 fits
        time.sleep(0.2)
        assert pf.read_bytes == sizes[1]  # layer 2 would exceed the window
        pf.loading(1)
        assert _wait_for(lambda: pf.read_bytes == sizes[1] + sizes[2])
    finally:
        pf.close()
    assert not pf._thread.is_alive()
    every = Prefetcher(ckpt, layers, window=1 << 40)
    assert _wait_for(lambda: every.read_bytes == sum(sizes[1:]))
    every.close()


def test_a_layer_larger_than_the_window_is_read_ahead_in_part(tiny_models, monkeypatch):
    from mop_ray.checkpoint import prefetch

    monkeypatch.setattr(prefetch, "CHUNK", 256)
    ckpt = Checkpoint(tiny_models["deepseek_v3"])
    layers = list(range(ckpt.num_layers))
    sizes = Prefetcher(ckpt, layers, window=0).sizes
    pf = Prefetcher(ckpt, layers, window=sizes[1] // 2)
    try:
        assert _wait_for(lambda: pf.read_bytes > 0)
        time.sleep(0.3)
        assert sizes[1] // 2 - 256 * 8 <= pf.read_bytes <= sizes[1] // 2  # the window's worth of layer 1, no more
    finally:
        pf.close()


def test_default_window_follows_the_environment_and_the_node(monkeypatch):
    from mop_ray.checkpoint import prefetch

    monkeypatch.setenv("MOP_RAY_PREFETCH_GB", "0")
    assert prefetch.default_window() == 0
    monkeypatch.setenv("MOP_RAY_PREFETCH_GB", "1.5")
    assert prefetch.default_window() == int(1.5 * 2**30)
    monkeypatch.delenv("MOP_RAY_PREFETCH_GB")
    assert 0 < prefetch.default_window() <= 16 << 30  # this machine
    monkeypatch.setattr(prefetch, "_available", lambda: 64 << 30)
    monkeypatch.setattr(prefetch, "_gpus_on_node", lambda: 1)
    assert prefetch.default_window() == 8 << 30
    monkeypatch.setattr(prefetch, "_gpus_on_node", lambda: 8)  # eight stages share the node's memory
    assert prefetch.default_window() == 1 << 30
    monkeypatch.setattr(prefetch, "_available", lambda: 1 << 40)
    assert prefetch.default_window() == 16 << 30

"""Output shards written while the stages still select: the driver side of ``ShardsAhead``.

A stage selects each MoE layer as soon as the final wave has passed it (``LayerShardWorker.selected_early``
reports them from its own concurrency group, while the waves run); a driver thread hands every layer's kept
experts to ``ShardsAhead``, which starts each output shard's Ray write task once all of its layers are chosen. The
write phase then only writes the shards that hold the last layers, instead of the whole checkpoint.
"""

from __future__ import annotations

import threading
from pathlib import Path

import ray

from actors.disk_space import same_file_system
from actors.shard_writer import ray_shard_submit
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.checkpoint.writer import ShardsAhead

POLL_S = 2.0  # a stage's ``selected_early`` waits this long for a layer before answering with none


def shards_ahead(ckpt: Checkpoint, out: Path, run_dir: Path, r: int, max_shard_size: str, runtime_env: dict | None,
                 log) -> ShardsAhead | None:
    """A ``ShardsAhead`` writing into ``run_dir/shards``, or None where the shards could not be moved into ``out``
    by a rename (another file system)."""
    if not same_file_system(run_dir, out.parent):
        log(f"write: {run_dir} and {out.parent} are on different file systems; shards are written after selection")
        return None
    return ShardsAhead(ckpt, run_dir / "shards", r, max_shard_size, ray_shard_submit(runtime_env=runtime_env))


class EarlyChoices:
    """A driver thread that asks each stage for the layers it selected beside the waves and passes every layer's
    kept ids to ``on_layer`` (``ShardsAhead.offer``) at once. It ends when every stage has answered for all of its
    ``layers`` (deferred ones included), when a stage is lost (the select phase deals with that), or on ``stop``."""

    def __init__(self, actors: list, layers: list[list[int]], on_layer, log):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(actors, layers, on_layer, log), name="early-choices",
                                        daemon=True)
        self._thread.start()

    def _run(self, actors: list, layers: list[list[int]], on_layer, log) -> None:
        asked = {a.selected_early.remote(POLL_S): (a, set(ls)) for a, ls in zip(actors, layers) if ls}
        while asked and not self._stop.is_set():
            ready, _ = ray.wait(list(asked), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, left = asked.pop(ref)
                try:
                    chosen = ray.get(ref)
                except ray.exceptions.RayError:  # a lost stage: the select phase chooses its layers again
                    continue
                for layer, result in chosen.items():
                    left.discard(layer)
                    if result is None:
                        continue
                    try:
                        on_layer(layer, result[1])
                    except Exception as e:  # noqa: BLE001 - the write phase writes whatever did not start here
                        log(f"write: could not start writing ahead after layer {layer} ({type(e).__name__}: {e})")
                if left and not self._stop.is_set():
                    asked[actor.selected_early.remote(POLL_S)] = (actor, left)
        for ref in asked:  # stopped: the stages' last answers, taken so that none is left unread
            try:
                ray.get(ref, timeout=POLL_S + 5)
            except ray.exceptions.RayError:
                pass

    def stop(self) -> None:
        """End the thread (within about ``POLL_S``, a stage's answer it may still be waiting for)."""
        self._stop.set()
        self._thread.join(timeout=POLL_S + 5)

"""Stages in rounds, resumable: after each round but the last, the hidden states it hands on (one safetensors file
per micro-batch, ``run_dir/rounds/stages-done-K/``) and what its stages recorded and chose (the manifest's
``observe_rounds``), so that a driver killed in a later round goes on from there with ``--resume`` instead of
running every round again. Written in a thread while the next round runs; a failure to write is logged, not raised
(the job goes on; only a resume loses it)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import ray

PHASE = "observe_rounds"  # the manifest's entry for the last saved boundary


class InputsLost(RuntimeError):
    """A round lost a stage and its inputs were not saved (the save failed): the object store's copy may have gone
    with a lost node, so the phase restarts at the last saved round."""


def boundary_dir(run: Path, stages_done: int) -> Path:
    return run / "rounds" / f"stages-done-{stages_done}"


def resume_point(run: Path, manifest, plan: list[list[int]]) -> dict | None:
    """The last saved boundary's state when it belongs to this plan (the same stages' layers) and its hidden states
    are on disk; else None (observe starts at the first round)."""
    state = manifest.done(PHASE)
    if not state or state.get("plan") != plan or not boundary_dir(run, state["stages_done"]).is_dir():
        return None
    return state


def put_hidden(run: Path, stages_done: int, waves: list[list[int]]) -> list:
    """The hidden states saved once ``stages_done`` stages had run, into the object store: per wave, one ref to its
    micro-batches' [B, L, H] host tensors (what the round's first stage takes)."""
    from safetensors.torch import load_file

    d = boundary_dir(run, stages_done)
    return [ray.put([load_file(d / f"mb-{mb:05d}.safetensors")["h"] for mb in wave]) for wave in waves]


def chosen_from(state: dict, method: str, keep: int) -> dict:
    """The saved selections ({layer: (layer, kept, scores, details)}) when made with this method and keep."""
    if state.get("method") != method or state.get("keep") != keep:
        return {}
    return {int(k): tuple(v) for k, v in state.get("chosen", {}).items()}


class BoundarySaver:
    """Saves one boundary at a time in a thread: fetches each wave's output from the object store, writes it per
    micro-batch into a temporary directory, renames it into place, then marks the manifest and drops the older
    boundary."""

    def __init__(self, run: Path, manifest, log):
        self.run, self.manifest, self.log = run, manifest, log
        self._thread: threading.Thread | None = None

    def save(self, stages_done: int, waves: list[list[int]], outputs: list, state: dict) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._save, args=(stages_done, waves, outputs, state),
                                        name="round-boundary", daemon=True)
        self._thread.start()

    def _save(self, stages_done: int, waves: list[list[int]], outputs: list, state: dict) -> None:
        from safetensors.torch import save_file

        final = boundary_dir(self.run, stages_done)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for wave, ref in zip(waves, outputs):
                for mb, h in zip(wave, ray.get(ref)):
                    save_file({"h": h.contiguous()}, str(tmp / f"mb-{mb:05d}.safetensors"))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            previous = self.manifest.done(PHASE)
            self.manifest.mark(PHASE, {**state, "stages_done": stages_done})
            if previous and previous.get("stages_done") != stages_done:
                shutil.rmtree(boundary_dir(self.run, previous["stages_done"]), ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - only a resume needs it
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"observe: could not save the hidden states after stage {stages_done - 1} for --resume "
                     f"({type(e).__name__}: {e}); going on")

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def clear(run: Path) -> None:
    """Observe is done: the boundaries are not needed again."""
    shutil.rmtree(run / "rounds", ignore_errors=True)

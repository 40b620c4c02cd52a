"""LayerShard: a Ray actor holding consecutive decoder layers [a, b) on one GPU (or a CPU worker).

It builds its layers on ``meta`` from the arch adapter, loading only their tensors, in a background thread, and
runs calibration waves through them: a wave is a few micro-batches taken layer by layer, so layer j computes
while layer j+1 loads. The first stage owns the token embedding and takes token ids; every stage but the last
returns the wave's hidden states on the host for the next one. While recording, each MoE block's forward goes
through an ``MoEObserver`` (statistics over all tokens + the sampled rows), which for few experts also computes
the block's output from its all-experts pass instead of running the block's own top-k pass. Given a selection at
``begin``, a stage also selects each MoE layer's kept experts as soon as the final wave has passed it, in a thread on
its own CUDA stream, while the next layers observe. A stage that takes a single wave and whose layers do not all fit
its device streams them: it holds at most ``mop_ray.plan.stream_budget`` bytes of layers, lets each go once the
wave has passed it and its selection is done, and loads the next ones into the room.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import ray
import torch

from actors.warm_up import warm_up as warm_up_layer
from mop_ray.arch.kernels import prepare as prepare_kernels
from mop_ray.arch.layer import build_layer, compute_dtype, dtype_named, hf_config, layer_state_dict, rotary_embedding
from mop_ray.checkpoint.prefetch import Prefetcher
from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError
from mop_ray.observe.observer import MoEObserver, token_meta
from mop_ray.observe.records import SampleWriter, layer_dir, write_stats
from mop_ray.plan import check_fits, stream_budget


# where first calls cost enough to warm up (lazily loaded kernels, cuBLAS, pinned memory); MOP_RAY_WARM_UP=0: nowhere
WARM_UP_DEVICES = ("cuda",)


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor (CUDA_VISIBLE_DEVICES is set per actor), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """(total bytes, name) of the stage's GPU; None on the CPU, whose memory the stage does not plan."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)


def _fault_injection(layers: list[int], mb_id: int | str) -> None:
    """Test hooks: MOP_RAY_FAULT_EXIT="<layer>:<micro-batch>:<marker file>" kills the process holding that layer
    once, at that micro-batch (or "select": when it selects for that layer; the marker file makes it once), so
    tests can exercise actor loss for real; MOP_RAY_FAULT_HANG (the same form) stops it there instead, until its
    node is removed."""
    for var in ("MOP_RAY_FAULT_EXIT", "MOP_RAY_FAULT_HANG"):
        if not (spec := os.environ.get(var)):
            continue
        layer, mb, marker = spec.split(":", 2)
        if int(layer) in layers and mb == str(mb_id) and not os.path.exists(marker):
            open(marker, "w").close()
            if var == "MOP_RAY_FAULT_EXIT":
                os._exit(1)
            time.sleep(3600)


def _event_after(events: list | None, layer: int | None, mb: int | None) -> None:
    """Append (layer, mb, a CUDA event recorded on the current stream) to ``events`` (``wave_events``), if any."""
    if events is not None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append((layer, mb, event))


class LayerShardWorker:
    """The actor body; ``ray.remote(LayerShardWorker)`` is created by the coordinator with its resources.

    ``__init__`` returns at once: a loader thread reads and builds the layers in order (the next layer's read
    ahead in a second thread, copies to the GPU on a side stream), and ``forward_wave`` runs each layer as soon
    as it is on the device, so a stage computes layer j while layer j+1 still loads."""

    def __init__(self, model_dir: str, layers: list[int], run_dir: str, sources: list[str] | None, *,
                 first_stage: bool, record: bool = True, dtype: str | None = None,
                 warm_up: tuple[int, int] | None = None, one_wave: bool = False, activation_bytes: int = 0,
                 memory_bytes: int | None = None):
        """Start loading the layers; with ``sources`` (the calibration's source names) also start recording, else
        ``begin(sources)`` does (the coordinator starts the stages while it tokenises the calibration set).
        ``warm_up``: the micro-batches' shape (blocks, tokens per block); on a GPU, a stand-in layer runs one
        beside the first layer's load (``actors.warm_up``), so the first wave does not pay the first calls.
        ``one_wave``: the stage takes a single (final) wave, so it may stream layers that do not all fit its device
        beside ``activation_bytes`` (the plan's estimate of its activations); ``memory_bytes``: the device memory
        to plan for (default: the GPU's total; a CPU stage: none, it holds every layer)."""
        t0 = time.perf_counter()
        self.load_times: dict[str, float] = {"read_s": 0.0}  # seconds per step of the load (benchmarks/speed.py)
        self.ckpt = Checkpoint(model_dir)
        self.layer_ids = list(layers)
        self.run_dir = run_dir
        self.record = record
        self.sources: list[str] | None = None
        self.observers: dict[int, MoEObserver] = {}
        self._observed_blocks: dict[int, torch.nn.Module] = {}  # layer -> MoE block whose forward observes
        self._closed: dict[int, Future] = {}  # layer -> {"rows", "tokens"} once its records are written
        self._early: dict[int, Future] = {}  # layer -> its selection result, or None when left for ``select``
        self._early_done: queue.Queue[int] = queue.Queue()  # layers whose early selection ended, for ``selected_early``
        self._selection: tuple | None = None  # ({layer: LayerContext}, method, r) from ``begin``
        self._worker: ThreadPoolExecutor | None = None  # closes records and selects, beside the waves
        self._side: torch.cuda.Stream | None = None  # the worker's CUDA stream
        self._meta: dict | None = None
        self.device = pick_device()
        self._compute: torch.cuda.Stream | None = None  # the waves' stream (made by the first wave)
        # benchmarks set a list: the next wave appends (layer, micro-batch, CUDA event recorded after that call),
        # after a (None, None, event) at its start
        self.wave_events: list | None = None
        self._waves_done = 0  # forward_wave calls that went through (``finish(expect_waves)`` checks them)
        self._wave_error: BaseException | None = None  # the first wave's error here, raised again by ``finish``
        self._built: list[Future] = [Future() for _ in self.layer_ids]  # -> the decoder layer on the device
        self._one_wave, self._activation_bytes, self._memory_bytes = one_wave, activation_bytes, memory_bytes
        self._budget: int | None = None  # streaming: bytes of layers held at once (None: every layer stays)
        self._held: dict[int, int] = {}  # streaming: layer -> its bytes, from its read until it is let go
        self._let_go: set[int] = set()  # streaming: layers whose weights are gone (their modules on ``meta``)
        self._letting_go: list[Future] = []  # streaming: the worker's let-go tasks (``select`` waits for them)
        self._room = threading.Condition()  # the loader waits on it for room; a let-go layer notifies it
        self._inputs: Future = Future()  # -> (rotary embedding, token embedding or None)
        self._warmed: Future = Future()  # done once the warm-up has run (at once without one)
        on = self.device.type in WARM_UP_DEVICES and os.environ.get("MOP_RAY_WARM_UP", "1") != "0"
        self._warm_up = warm_up if on and self.layer_ids else None
        if self._warm_up is None:
            self._warmed.set_result(None)
        self._loader = threading.Thread(target=self._load, args=(dtype_named(dtype), first_stage, t0),
                                        name="layer-load", daemon=True)
        self._loader.start()
        # the fused kernels' first launch (Triton's driver, ~0.5 s) beside the imports; the warm-up waits for it
        self._kernels = threading.Thread(target=self._prepare_kernels, args=(dtype_named(dtype),),
                                         name="kernels", daemon=True)
        if self._warm_up is not None:
            self._kernels.start()
        if sources is not None:
            self.begin(sources)

    @property
    def layers(self) -> list[torch.nn.Module]:
        """This stage's decoder layers, once all are loaded (raises what the loader raised)."""
        return [f.result() for f in self._built]

    def _load(self, dtype, first_stage: bool, t0: float) -> None:
        """The loader thread: the embedding's and first layer's reads start before the imports transformers needs;
        layer j+1 is read while layer j is built and copied; at most one layer is read ahead, so host memory holds
        at most two layers' tensors (and the first stage's embedding) on the way to a GPU."""
        times, ids = self.load_times, self.layer_ids
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        prefetch = None
        warming = None  # the warm-up thread, once started
        try:
            memory = device_memory(self.device)
            if self._memory_bytes is not None:
                memory = (self._memory_bytes, memory[1] if memory else "CPU")
            if memory is not None:  # layers that cannot fit fail now, not minutes into their copies
                if self._one_wave and ids:
                    self._budget = stream_budget(self.ckpt, ids, first_stage, *memory, self._activation_bytes)
                if self._budget is None:
                    check_fits(self.ckpt, ids, first_stage, *memory)
            times["stream_budget_gb"] = (self._budget or 0) / 1e9
            times["held_peak_gb"] = times["room_wait_s"] = 0.0
            prefetch = Prefetcher(self.ckpt, ids)  # the next layers into the page cache while transformers imports
            embed = reader.submit(self._read_embedding) if first_stage else None
            ahead = self._read_ahead(reader, ids[0], wait=True) if ids else None
            config = hf_config(self.ckpt)
            times["config_s"] = time.perf_counter() - t0
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                rotary = rotary_embedding(self.ckpt, config, self.device)
                module = None
                if embed is not None:
                    weight = embed.result()
                    module = torch.nn.Embedding.from_pretrained(weight.to(dtype) if dtype else weight).to(self.device)
                    del weight
                if stream is not None:
                    stream.synchronize()
                self._inputs.set_result((rotary, module))
                if self._warm_up is not None:
                    warming = threading.Thread(target=self._warm, args=(rotary, dtype), name="warm-up", daemon=True)
                    warming.start()
                times["read_wait_s"] = times["build_s"] = 0.0
                for j, i in enumerate(ids):
                    t = time.perf_counter()
                    sd = ahead.result()
                    times["read_wait_s"] += time.perf_counter() - t
                    nxt = ids[j + 1] if j + 1 < len(ids) else None
                    ahead = self._read_ahead(reader, nxt, wait=False) if nxt is not None else None
                    prefetch.loading(j + 1)
                    t = time.perf_counter()
                    layer = build_layer(self.ckpt, i, config=config, device=self.device, dtype=dtype, state_dict=sd)
                    del sd
                    if i in self.ckpt.moe_layers:
                        layer.mlp.forward = self._observed(i, layer.mlp)  # an instance attribute: undone in finish
                        self._observed_blocks[i] = layer.mlp
                    if stream is not None:
                        stream.synchronize()  # on the device before any compute uses it
                    times["build_s"] += time.perf_counter() - t  # build on meta, assign, copy to the device
                    self._built[j].set_result(layer)
                    if nxt is not None and ahead is None:  # streaming, no room before this build: wait for it now
                        ahead = self._read_ahead(reader, nxt, wait=True)
            times["total_s"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - every waiter gets the loader's error (a MopError for bad layers)
            for f in [self._inputs, *self._built]:
                if not f.done():
                    f.set_exception(e)
            if warming is None and not self._warmed.done():
                self._warmed.set_result(None)  # no warm-up thread will
        finally:
            if prefetch is not None:
                prefetch.close()
                times["prefetched_gb"] = prefetch.read_bytes / 1e9
            reader.shutdown(wait=True, cancel_futures=True)

    def _read_ahead(self, reader: ThreadPoolExecutor, i: int, wait: bool) -> Future | None:
        """Start reading layer ``i`` (its tensors go straight to the device); streaming, only once it fits the
        budget beside the layers held: ``wait`` for that room, else None when there is none now."""
        if self._budget is not None:
            need = self.ckpt.resident_layer_bytes.get(i, 0)
            t = time.perf_counter()
            with self._room:
                while self._held_bytes() + need > self._budget:
                    if not wait:
                        return None
                    if self._wave_error is not None:
                        raise MopError(f"layer {i} was not loaded: a wave failed on this stage") from self._wave_error
                    self._room.wait(timeout=1.0)
                self._held[i] = need
                self.load_times["held_peak_gb"] = max(self.load_times["held_peak_gb"], self._held_bytes() / 1e9)
            self.load_times["room_wait_s"] += time.perf_counter() - t
        return reader.submit(self._read, i)

    def _held_bytes(self) -> int:
        """Streaming: the bytes of the layers held now (call with ``_room`` held)."""
        return sum(self._held.values())

    def _let_go_after(self, i: int) -> None:
        """Streaming: layer ``i``'s weights go once what was queued for it (records, selection) is done."""
        if self._worker is not None:  # one thread: after the tasks ``_close_early`` queued for the layer
            self._letting_go.append(self._worker.submit(self._let_go_layer, i))
        else:
            self._let_go_layer(i)

    def _let_go_layer(self, i: int) -> None:
        """Free layer ``i``'s weights (its module moves to ``meta``) and make room for the loader. On a GPU each
        tensor is marked used by the waves' and the selections' streams, so the caching allocator reuses its memory
        only after their queued kernels on it are done (no wait here)."""
        layer = self._built[self.layer_ids.index(i)].result()
        if self.device.type == "cuda":
            for t in itertools.chain(layer.parameters(), layer.buffers()):
                for stream in (self._compute, self._side):
                    if stream is not None and t.is_cuda:
                        t.record_stream(stream)
        layer.to(torch.device("meta"))
        with self._room:
            self._let_go.add(i)
            self._held.pop(i, None)
            self._room.notify_all()

    def _warm(self, rotary: torch.nn.Module, dtype: torch.dtype | None) -> None:
        """The warm-up thread: ``actors.warm_up`` on the waves' stream (its memory stays cached for them), on the
        stage's first MoE layer (else its first layer). A failure is logged, not raised: the first wave then pays
        the first calls as it would have without a warm-up."""
        moe = [i for i in self.layer_ids if i in self.ckpt.moe_layers]
        layer = (moe or self.layer_ids)[0]
        self._kernels.join()
        try:
            dtype = dtype or compute_dtype(self.ckpt, sorted(self.ckpt.layer_tensors(layer)))
            if self.device.type == "cuda":
                self._compute = torch.cuda.Stream(self.device, priority=-1)
            with torch.cuda.stream(self._compute) if self._compute is not None else nullcontext():
                done = warm_up_layer(self.ckpt, layer, rotary, self.device, dtype, self._warm_up)
            self.load_times["warm_up_s"] = done["s"]
        except Exception as e:  # noqa: BLE001 - an optimisation only
            print(f"mop-ray: stage warm-up on layer {layer} failed, going on without it: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        finally:
            self._warmed.set_result(None)

    def _prepare_kernels(self, dtype: torch.dtype | None) -> None:
        """The kernels thread: ``mop_ray.arch.kernels.prepare`` in the layers' dtype (bf16 when the checkpoint
        does not say); a failure is logged, not raised (the warm-up then pays the first launch)."""
        try:
            self.load_times["kernels_s"] = prepare_kernels(self.device, dtype or torch.bfloat16)
        except Exception as e:  # noqa: BLE001 - an optimisation only
            print(f"mop-ray: stage could not prepare the fused kernels: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        # the fused experts straight onto the GPU (pinned chunks, one host copy per byte; every layer of a stage
        # stays on its GPU anyway); block-FP8 weights dequantized there by ``build_layer``
        sd = layer_state_dict(self.ckpt, i, packed_fp8=True, device=self.device)
        self.load_times["read_s"] += time.perf_counter() - t  # in the reader thread, overlapping the builds
        return sd

    def _read_embedding(self) -> torch.Tensor:
        from safetensors import safe_open

        name = "model.embed_tokens.weight"
        with safe_open(self.ckpt.tensors[name].path, "pt") as f:
            return f.get_tensor(name)  # [V, H]

    def begin(self, sources: list[str], select: tuple | None = None) -> None:
        """Observe every MoE layer this stage holds (when recording), with statistics per source. ``select``:
        (contexts, method, r) of ``select`` for this stage's layers: each is chosen as soon as the final wave
        (``forward_wave(final=True)``) has passed its layer, where memory allows (``_room_to_select``)."""
        self.sources = sources
        if not self.record:
            return
        if select is not None:
            contexts, method, r = select
            self._selection = ({ctx.layer: ctx for ctx in contexts}, method, r)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-close")
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        ckpt = self.ckpt
        spec = ckpt.family.router_spec(ckpt.config)
        for i in self.layer_ids:
            if i in ckpt.moe_layers:
                self.observers[i] = MoEObserver(i, ckpt.family, spec, ckpt.num_experts, len(sources),
                                                SampleWriter(layer_dir(self.run_dir, i), sources))

    def _observed(self, i: int, moe: torch.nn.Module):
        """The MoE block's forward while recording: the observer computes the block's output from the all-experts
        pass its statistics need (``MoEObserver.forward``) when every expert's output on the micro-batch fits its
        budget; otherwise the block runs as it is and the observer sees its input and output."""
        plain = moe.forward

        def forward(hidden_states, *args, **kwargs):
            obs = self.observers.get(i)
            if obs is None or self._meta is None:  # not recording (or not yet begun): a plain forward
                return plain(hidden_states, *args, **kwargs)
            return obs.block_forward(moe, plain, self._meta, hidden_states, *args, **kwargs)
        return forward

    def forward(self, mb_id: int, inp: torch.Tensor, meta: dict, last: bool = False) -> torch.Tensor | None:
        """One micro-batch (``forward_wave`` of one): token ids [B, L] on the first stage, hidden states [B, L, H]
        after; -> [B, L, H] on the host for the next stage, None from the ``last`` stage."""
        out = self.forward_wave([mb_id], [inp], [meta], last)
        return None if out is None else out[0]

    @torch.no_grad()
    def forward_wave(self, mb_ids: list[int], inputs: list[torch.Tensor], metas: list[dict],
                     last: bool = False, final: bool = False) -> list[torch.Tensor] | None:
        """Run a wave of micro-batches layer by layer (every micro-batch through layer j, then j+1: the wave's
        hidden states stay on the device, and layer j+1 may still be loading while layer j computes).
        inputs: token ids [B, L] each on the first stage, hidden states [B, L, H] after. ``final``: no wave
        follows, so each MoE layer's records are closed (and its selection started) once the wave has passed it.
        -> the wave's hidden states on the host for the next stage, None from the ``last`` stage."""
        for mb in mb_ids:
            _fault_injection(self.layer_ids, mb)
        try:
            self._warmed.result()  # the warm-up runs on the waves' stream, before the first wave
            if self.device.type != "cuda":
                out = self._forward_wave(inputs, metas, last, final)
            else:
                if self._compute is None:  # of higher priority than the worker's: selecting beside the waves delays them less
                    self._compute = torch.cuda.Stream(self.device, priority=-1)
                with torch.cuda.stream(self._compute):
                    out = self._forward_wave(inputs, metas, last, final)
        except BaseException as e:
            self._wave_error = self._wave_error or e
            raise
        self._waves_done += 1
        return out

    def _forward_wave(self, inputs: list[torch.Tensor], metas: list[dict], last: bool, final: bool):
        rotary, embed = self._inputs.result()
        if self._budget is not None and (not final or self._let_go):
            raise MopError(f"the stage holding layers {self.layer_ids[0]}-{self.layer_ids[-1]} streams its layers "
                           "(they do not all fit its device) and takes a single final wave, not "
                           + ("one wave of several" if not final else "a second one"))
        dev = self.device
        hs, pos, pes, metas_host = [], [], [], []
        for inp, meta in zip(inputs, metas):
            h = embed(inp.to(dev)) if embed is not None else inp.to(dev)  # [B, L, H]
            bsz, seq = h.shape[:2]
            p = torch.arange(seq, device=dev).unsqueeze(0).expand(bsz, -1)  # [B, L]
            hs.append(h)
            pos.append(p)
            pes.append(rotary(h, p))
            metas_host.append(token_meta(meta["source"], meta["block"], seq, meta["sample"], dev))
        events = self.wave_events if dev.type == "cuda" else None
        try:
            _event_after(events, None, None)
            for i, built in zip(self.layer_ids, self._built):
                layer = built.result()  # waits while this layer is still loading
                for k in range(len(hs)):
                    self._meta = metas_host[k]
                    out = layer(hs[k], attention_mask=None, position_ids=pos[k], position_embeddings=pes[k])
                    hs[k] = out[0] if isinstance(out, tuple) else out
                    _event_after(events, i, k)
                if final and i in self.observers and i in self._observed_blocks:
                    self._close_early(i)
                if self._budget is not None:
                    self._let_go_after(i)
        finally:
            self._meta = None
        if last:
            if dev.type == "cuda":
                # the wave is done (and timed) when the call returns: its stream only, since a device-wide sync
                # is refused while the worker captures a CUDA graph for the layer selected beside it
                torch.cuda.current_stream(dev).synchronize()
            return None
        if dev.type == "cuda":  # through (cached) pinned memory: a direct DMA, no page faults
            return [torch.empty(h.shape, dtype=h.dtype, pin_memory=True).copy_(h) for h in hs]
        return [h.cpu() for h in hs]

    def loaded(self) -> dict[str, float]:
        """Seconds of this stage's load, once all layers are on the device: total (from ``__init__``), the reads
        (in their thread), the transformers imports, waiting for reads, and builds with copies."""
        self._loader.join()
        return dict(self.load_times)

    def _close_early(self, i: int) -> None:
        """Layer ``i`` has seen its last micro-batch: unobserve its block (selection may run it) and, in the worker
        thread on the side stream once the wave's work on the layer is done, write its records and select it."""
        self._unobserve(i)
        done = None
        if self._side is not None:
            done = torch.cuda.Event()
            done.record()  # after the layer's last kernels on this thread's stream
        self._closed[i] = self._worker.submit(self._on_side, done, self._close_records, i)
        if self._selection is not None and i in self._selection[0]:
            f = self._early[i] = self._worker.submit(self._on_side, done, self._select_early, i)
            f.add_done_callback(lambda _, i=i: self._early_done.put(i))

    def _unobserve(self, i: int) -> None:
        """Layer ``i``'s MoE block runs the class's forward again (selection may run it, unobserved)."""
        del self._observed_blocks.pop(i).forward

    def _on_side(self, after: torch.cuda.Event | None, fn, *args):
        """``fn(*args)`` on the side stream, ordered after the event ``after`` (the observe thread's work)."""
        if self._side is None:
            return fn(*args)
        with torch.cuda.stream(self._side):
            self._side.wait_event(after)
            return fn(*args)

    def _close_records(self, i: int) -> dict:
        """Close layer ``i``'s sample file and write its statistics; -> {"rows", "tokens"}."""
        obs = self.observers[i]
        rows = obs.sample_writer.rows
        obs.sample_writer.close()
        write_stats(layer_dir(self.run_dir, i), self.sources, obs.tokens, obs.stats)  # obs.stats: to the host once
        return {"rows": rows, "tokens": int(obs.tokens.sum())}

    def finish(self, expect_waves: int | None = None) -> dict[int, dict]:
        """Close the sample files and write the statistics of layers no final wave closed; wait for the others.
        ``expect_waves``: raise instead (a wave's own error, else a MopError) unless that many waves went through
        here — for a caller that does not fetch every wave's result. -> {layer: {"rows", "tokens"}}."""
        if expect_waves is not None and self._waves_done != expect_waves:
            if self._wave_error is not None:
                raise self._wave_error
            raise MopError(f"the stage holding layers {self.layer_ids[0]}-{self.layer_ids[-1]}: {self._waves_done} of "
                           f"{expect_waves} waves went through (an earlier stage failed); its records are not written")
        self._loader.join()
        for i in list(self._observed_blocks):
            self._unobserve(i)
        if self._compute is not None:
            self._compute.synchronize()  # the statistics' last sums, before this thread's stream reads them
        return {i: self._closed[i].result() if i in self._closed else self._close_records(i) for i in self.observers}

    def select(self, contexts: list, method: str, r: int) -> list:
        """``actors.tasks.select_layer`` for MoE layers this stage holds, with the weights it already has in
        memory (no second read of the layer); call after ``finish``. Layers selected beside the waves (``begin``'s
        ``select``) return that result. -> one result per context."""
        early = {}
        for ctx in contexts:  # all early ones first: one selection at a time on the device
            f = self._early.get(ctx.layer)
            early[ctx.layer] = f.result() if f is not None else None
        for f in self._letting_go:  # streaming: every layer's weights gone before any is read again
            f.result()
        return [early[ctx.layer] or self._select_one(ctx, method, r) for ctx in contexts]

    @ray.method(concurrency_group="poll")
    def selected_early(self, wait_s: float = 5.0) -> dict[int, tuple | None]:
        """Layers whose selection beside the waves ended since the last call, waiting up to ``wait_s`` for the first:
        {layer: ``select_layer``'s result, or None where ``select`` chooses it (no room, or it failed)}. In its own
        concurrency group, so it answers while a wave runs: the coordinator writes output shards from it."""
        try:
            ended = [self._early_done.get(timeout=wait_s)]
        except queue.Empty:
            return {}
        while not self._early_done.empty():
            ended.append(self._early_done.get())
        return {i: self._early[i].result() if self._early[i].exception() is None else None for i in ended}

    def _select_early(self, i: int):
        """Layer ``i``'s selection beside the waves, or None (left for ``select``) when the device lacks room."""
        ctxs, method, r = self._selection
        if not self._room_to_select(i):
            return None
        try:
            return self._select_one(ctxs[i], method, r, clear_cache=False)
        except torch.cuda.OutOfMemoryError:  # the waves took more than estimated: select after them instead
            torch.cuda.empty_cache()
            return None

    def _room_to_select(self, i: int) -> bool:
        """Whether layer ``i``'s selection fits beside the layers still to load and the waves' working set: the
        device's free and cached bytes less those layers must hold twice the selection's estimate
        (``mop_ray.methods.products.selection_bytes``, and the expert-output chunks it sizes from free memory).
        A record-only method (REAP, frequency, ...) reads the layer's statistics and takes no device memory."""
        from mop_ray.methods import get_method

        if self.device.type != "cuda" or not get_method(self._selection[1]).needs_weights:
            return True
        from mop_ray.methods.products import layer_selection_bytes

        ckpt = self.ckpt
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        loading = sum(ckpt.resident_layer_bytes.get(j, 0) for j, f in zip(self.layer_ids, self._built) if not f.done())
        if self._budget is not None:  # streaming: the loader takes at most the budget's room
            with self._room:
                loading = min(loading, max(self._budget - self._held_bytes(), 0))
        block = self._built[self.layer_ids.index(i)].result().mlp
        need = layer_selection_bytes(ckpt, self.observers[i].sample_writer.rows,
                                     block.experts.gate_up_proj.element_size() == 2) + (2 << 30)
        return free - loading >= 2 * need

    def _select_one(self, ctx, method: str, r: int, clear_cache: bool = True):
        from actors.tasks import select_layer

        _fault_injection([ctx.layer], "select")
        # a layer let go (streaming) is read again by the selection itself, as a selection task would
        block = None if ctx.layer in self._let_go else self._built[self.layer_ids.index(ctx.layer)].result().mlp
        out = select_layer(self.run_dir, ctx, method, r, block=block)
        if clear_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the next layer's products start from a clean pool
        return out

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                "gpus": ray.get_gpu_ids(), "layers": self.layer_ids}

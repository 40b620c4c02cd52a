"""Per-MoE-layer observation: streaming statistics over all calibration tokens plus a token sample.

For every micro-batch an ``MoEObserver`` gets the MoE block's input X [T, H] and original output Z [T, H]
and computes, with each expert run once over all T tokens (one matmul pair per expert, no token loop):

per (source s, expert e), summed over tokens (float64):
- ``freq``      tokens whose top-k contains e;
- ``reap_sum``  Σ_routed g_e(x)·‖f_e(x)‖₂ with g the renormalised top-k gates (REAP, arXiv 2510.13999 §3);
- ``ean_sum``   Σ_routed ‖f_e(x)‖₂ (expert activation norm);
- ``err_sum``   Σ_all ‖E_e(x) − Z‖² where E_e is the layer with only e kept (MoP Eq. 5–7 before domains);
- ``p_sum``, ``plogp_sum``  Σ p_e and Σ p_e·log2 p_e of the full-softmax router probability, from which
  MoP Eq. 2 is exact: S_var(e) = plogp_sum/p_sum − log2 p_sum + log2 N;
and ``tokens`` per source. The sample rows (X, router logits, source, block, position, and Z or — up to 16
experts — the rows' expert products) go to ``sample.arrow`` (records.py).
"""

from __future__ import annotations

import numpy as np
import torch

from mop_ray import plan
from mop_ray.arch import Family, RouterSpec, route
from mop_ray.arch.experts import expert_forward
from mop_ray.arch.kernels import combine, error_and_norm
from mop_ray.arch.layer import thread_stream
from mop_ray.observe.records import STAT_FIELDS, SampleWriter, records_outputs, records_products


def token_meta(source, block, seq: int, sample, device: torch.device | None = None) -> dict:
    """Per-token host tensors of a micro-batch, as ``MoEObserver.block_forward`` takes them: ``source`` and
    ``block`` ([B] ints, one per block) repeated over the ``seq`` tokens of each block, ``pos`` the token's place in
    its block, ``sample`` ([B, seq] bools) whether the token is a sample row; [B*seq] each. With a CUDA ``device``,
    also "device": the source ids and the sample's row indices there, copied once for all the micro-batch's
    layers from pinned memory (a copy from pageable memory waits for the device's queue to drain: a stall in
    every layer's call)."""
    source, block = np.asarray(source), np.asarray(block)
    meta = {"source": torch.as_tensor(np.repeat(source, seq)), "block": torch.as_tensor(np.repeat(block, seq)),
            "pos": torch.arange(seq).repeat(len(block)),
            "sample": torch.from_numpy(np.array(sample, dtype=bool)).reshape(-1)}
    if device is not None and torch.device(device).type == "cuda":
        meta["device"] = {"source": _to_device(meta["source"].long(), device),  # [T]
                          "rows": _to_device(meta["sample"].nonzero().squeeze(1), device)}  # [N]
    return meta


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` through (cached) pinned memory, without a stream sync."""
    return t.pin_memory().to(device, non_blocking=True)


def single_expert_weight(spec: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    """Gate weight of expert e when it is the only kept expert, [T, E] (MoP's E_i(x) = w·f_i(x) + shared)."""
    if spec.scoring == "softmax" or spec.norm_topk_prob:
        return torch.full_like(logits, spec.routed_scaling_factor)  # softmax over one kept row = 1
    return logits.sigmoid() * spec.routed_scaling_factor  # un-normalised sigmoid gate


class MoEObserver:
    """Statistics are summed on the block's device (float64) and come to the host once, in ``stats``; the
    sampled rows go to the host through pinned memory without stalling the device (``SampleWriter`` waits)."""

    def __init__(self, layer: int, family: Family, spec: RouterSpec, n_experts: int, n_sources: int,
                 sample_writer: SampleWriter | None, acts_as: int | None = None):
        """``acts_as``: the expert count whose paths this observer takes (``fits``, recorded products and outputs),
        when it is not ``n_experts``: a warm-up's stand-in layer with fewer experts runs the kernels its layer runs."""
        self.layer, self.family, self.spec = layer, family, spec
        self.n_experts, self.n_sources = n_experts, n_sources
        self.acts_as = acts_as or n_experts
        self._sums: dict[str, torch.Tensor] | None = None  # {field: [S, E] float64} on the block's device
        self.tokens = np.zeros(n_sources, dtype=np.int64)
        self.sample_writer = sample_writer

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """{field: [S, E] float64} summed over the micro-batches so far."""
        if self._sums is None:
            return {f: np.zeros((self.n_sources, self.n_experts), dtype=np.float64) for f in STAT_FIELDS}
        return {f: v.cpu().numpy() for f, v in self._sums.items()}

    def fits(self, x: torch.Tensor) -> bool:
        """Whether every expert's output on x [T, H] fits ``mop_ray.plan.OUTPUTS_BUDGET`` at once (``forward`` keeps
        them; the stage's memory estimate counts them)."""
        return self.acts_as * x.shape[0] * x.shape[1] * x.element_size() <= plan.OUTPUTS_BUDGET

    def block_forward(self, moe: torch.nn.Module, plain, meta: dict, hidden_states: torch.Tensor, *args, **kwargs):
        """The MoE block's output for ``hidden_states`` [..., H], observed: from the all-experts pass (``forward``)
        when every expert's output fits its budget, else the block as it is (``plain``, its own forward) and
        ``observe``. ``meta``: the micro-batch's host tensors [T] "source", "sample", "block", "pos"."""
        h = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, h)
        on_device = meta.get("device")
        if self.fits(x):
            z = self.forward(moe, x, meta["source"], meta["sample"], meta["block"], meta["pos"], on_device)
        else:
            z = plain(hidden_states, *args, **kwargs).reshape(-1, h)
            self.observe(moe, x, z, meta["source"], meta["sample"], meta["block"], meta["pos"], on_device)
        return z.reshape(hidden_states.shape)

    @torch.no_grad()
    def forward(self, moe: torch.nn.Module, x: torch.Tensor, source: torch.Tensor, sample: torch.Tensor | None,
                block: torch.Tensor, pos: torch.Tensor, on_device: dict | None = None) -> torch.Tensor:
        """The MoE block's output z [T, H] for its input x [T, H], assembled from the all-experts pass the
        statistics need anyway, then observed as ``observe`` would: the block's own top-k pass is not run (a
        quarter more expert compute for top-2 of 8). Routing is ``mop_ray.arch.route`` on float32 logits — the
        same decisions the statistics count — and the gated expert outputs and shared term sum in float32, so z
        may differ from the stock block's by its half-precision rounding (and, for a token whose half-precision
        router logits would order two experts differently, by that choice). ``on_device``: ``token_meta``'s
        "device" copies of source and the sample rows, if made."""
        logits, idx, w = self._route(moe, x)
        stacked = torch.empty(self.n_experts, *x.shape, dtype=x.dtype, device=x.device)  # [E, T, H]
        for e in range(self.n_experts):
            expert_forward(moe.experts, x, e, out=stacked[e])
        shared = self.family.shared_output(moe, x)
        z = combine(stacked, idx, w, shared, x.dtype)  # Σ_j w_j f_{idx_j}(x) + shared, summed in float32
        self._observe(moe, x, z, source, sample, block, pos, (logits, idx, w), stacked.unbind(0), shared, on_device)
        return z

    @torch.no_grad()
    def observe(self, moe: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, source: torch.Tensor,
                sample: torch.Tensor | None, block: torch.Tensor, pos: torch.Tensor, on_device: dict | None = None) -> None:
        """x, z: [T, H] MoE input/output; source, block, pos: [T] int (host); sample: [T] bool rows to record;
        ``on_device``: as ``forward``'s."""
        self._observe(moe, x, z, source, sample, block, pos, self._route(moe, x), None, self.family.shared_output(moe, x),
                      on_device)

    def _route(self, moe, x):
        logits = torch.nn.functional.linear(x.float(), moe.gate.weight.float())  # [T, E]
        idx, w = route(self.spec, logits, getattr(moe.gate, "e_score_correction_bias", None))  # [T, k] ids, gates
        return logits, idx, w

    def _observe(self, moe, x, z, source, sample, block, pos, routed, outputs, shared, on_device=None) -> None:
        logits, idx, w = routed
        dev = x.device
        g = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # [T, k] renormalised top-k gates (REAP)
        p = logits.double().softmax(dim=-1)  # [T, E] full-softmax probabilities (MoP Eq. 2)
        base = -z.float() if shared is None else shared.float() - z.float()  # [T, H]: E_e(x) − Z = c·f_e + base
        c = single_expert_weight(self.spec, logits)  # [T, E]

        T, E = logits.shape
        routed_gate = torch.zeros(T, E, dtype=torch.float32, device=dev).scatter_(1, idx, g)  # [T, E]
        routed = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, idx, True)  # [T, E]
        norms = torch.empty(T, E, dtype=torch.float32, device=dev)
        err = torch.empty(T, E, dtype=torch.float32, device=dev)  # per token in float32, summed in float64
        for e in range(E):  # one batched expert evaluation over all T tokens
            f = outputs[e] if outputs is not None else expert_forward(moe.experts, x, e)  # [T, H], compute dtype
            error_and_norm(f, base, c[:, e], err[:, e], norms[:, e])  # MoP Eq. 5: ‖E_e(x) − Z‖², and ‖f_e(x)‖

        per_token = {
            "freq": routed,
            "reap_sum": routed_gate * norms,
            "ean_sum": routed * norms,
            "err_sum": err,
            "p_sum": p,
            "plogp_sum": torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p)),
        }
        if self._sums is None:
            self._sums = {f: torch.zeros(self.n_sources, E, dtype=torch.float64, device=dev) for f in STAT_FIELDS}
        src = on_device["source"] if on_device else source.to(dev, torch.long)
        for name, values in per_token.items():
            self._sums[name].index_add_(0, src, values.double())
        self.tokens += np.bincount(source.numpy(), minlength=self.n_sources)

        if self.sample_writer is not None and sample is not None:
            self._record_sample(moe, x, z, logits, source, sample, block, pos, outputs, shared, on_device)

    def _record_sample(self, moe, x, z, logits, source, sample, block, pos, outputs, shared, on_device) -> None:
        rows_host = sample.nonzero().squeeze(1)  # [N] sampled token indices, known on the host: no device sync
        if len(rows_host) == 0:
            return
        rows = on_device["rows"] if on_device else rows_host.to(x.device)
        parts = [t.index_select(0, rows) for t in (x, z, logits)]  # [N, H], [N, H], [N, E]
        if records_products(self.acts_as):  # the rows' expert products, so selection runs no expert again
            parts += self._row_products(moe, parts[0], parts[1], rows, outputs, shared)  # [N, E+2, E+2], [N]
        if not records_outputs(self.acts_as):
            parts[1] = None  # z: neither copied to the host nor written
        if not (x.dtype == torch.bfloat16 and z.dtype == torch.bfloat16):  # bf16 rows are stored as their bits
            parts[:2] = [None if t is None else t.float() for t in parts[:2]]  # the sampled rows only, not all T
        ready = None
        if x.device.type == "cuda":  # into (cached) pinned host memory on a copy stream: the next layer computes
            # meanwhile (on the waves' stream the copies held it ~1 ms a Mixtral-shaped call); the writer waits
            stream = thread_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts]
            with torch.cuda.stream(stream):
                for h, t in zip(host, parts):
                    if t is not None:
                        h.copy_(t, non_blocking=True)
                        t.record_stream(stream)  # its memory is not reused before the copy has read it
                ready = torch.cuda.Event()
                ready.record(stream)
            parts = host
        x, z, logits, *products = parts
        self.sample_writer.write(x, z, logits, source=source[rows_host].numpy(), block=block[rows_host].numpy(),
                                 pos=pos[rows_host].numpy(), ready=ready, gram=products[0] if products else None,
                                 yy=products[1] if products else None)

    def _row_products(self, moe, xs, zs, rows, outputs, shared) -> list[torch.Tensor]:
        """[Gram [N, E+2, E+2], ‖y‖² [N]] of the sampled rows (``row_products``) from the all-experts pass's outputs
        (or the rows' own, when the block ran as it is), y = z − shared: what ``expert_products`` computes from
        the sample, without running the experts again."""
        from mop_ray.methods.products import product_dtypes, row_products

        prec, store = product_dtypes(moe.experts.gate_up_proj.dtype, xs.device)
        f = ([o.index_select(0, rows) for o in outputs] if outputs is not None
             else [expert_forward(moe.experts, xs, e) for e in range(self.n_experts)])  # [N, H] each
        y = zs.to(prec) - (shared.index_select(0, rows).to(prec) if shared is not None else 0)  # [N, H]
        return [row_products(f, y, store), y.pow(2).sum(-1).double()]

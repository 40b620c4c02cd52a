"""Stage plan: consecutive decoder layers split into S pipeline stages balanced by bytes.

MoE layers weigh far more than dense ones (DeepSeek-V3's three dense layers are ~1/20 of an MoE layer), so
stages are balanced by the bytes of their tensors, not by layer count: the split minimises the largest
stage (exact, by binary search over the bottleneck with a greedy feasibility check). Bytes are resident
bytes: FP8 block-quantised weights count twice their file size, since stages dequantize them to bf16 for
calibration. The first stage also holds the token embedding. The memory estimate adds the all-experts
working set of one micro-batch (every expert's output at once when the observer keeps them), the hidden
states of one wave (micro-batches a stage takes layer by layer) and, for FP8, the float8 copy of the largest
layer's weights while it is dequantized on the device. ``fewest_stages`` plans for a GPU size; ``check_fits`` is
the stage's own refusal of layers whose weights exceed its GPU; ``stream_budget`` is what a stage that takes a single
wave keeps of its layers at once instead, when they do not all fit (each is let go once the wave has passed it and
its selection is done, so a model larger than the GPU needs no second stage).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mop_ray.checkpoint.reader import Checkpoint
from mop_ray.errors import MopError

OUTPUTS_BUDGET = 1 << 30  # bytes of expert outputs the observer may hold at once (all E on one micro-batch)


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, ...]
    weight_bytes: int
    activation_bytes: int
    transient_bytes: int = 0  # FP8: the float8 copy of its largest layer while it is dequantized on the device

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.transient_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "memory_bytes": self.memory_bytes}


def _split(costs: list[int], n_stages: int) -> list[list[int]]:
    """Indices of ``costs`` cut into n_stages consecutive non-empty runs minimising the largest run sum."""
    def cuts(limit: int) -> list[list[int]] | None:
        runs, cur, total = [], [], 0
        for i, c in enumerate(costs):
            if cur and total + c > limit:
                runs.append(cur)
                cur, total = [], 0
            cur.append(i)
            total += c
        runs.append(cur)
        return runs if len(runs) <= n_stages else None

    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    runs = cuts(lo)
    while len(runs) < n_stages:  # split the longest run so every stage has work
        j = max(range(len(runs)), key=lambda k: len(runs[k]))
        half = len(runs[j]) // 2
        runs[j:j + 1] = [runs[j][:half], runs[j][half:]]
    return runs


WAVE_BYTES = 4 << 30  # hidden states of one wave kept on a stage's device (bounds the wave's size)


def plan_waves(n_micro_batches: int, n_stages: int, micro_batch_bytes: int, waves: int | None = None) -> list[list[int]]:
    """Micro-batch indices cut into consecutive waves. A stage takes a wave layer by layer, so loading its next
    layer overlaps computing the current one, for every micro-batch of the wave; stages pipeline waves. Default:
    one wave with one stage (the whole stage's loading overlaps compute), 4 per stage otherwise (the pipeline
    keeps the stages busy at once, at the cost of less overlap of loading). Never more hidden-state bytes per
    wave than ``WAVE_BYTES``."""
    if n_micro_batches <= 0:
        return []
    n = waves if waves is not None else (1 if n_stages == 1 else 4 * n_stages)
    if n < 1:
        raise MopError(f"--waves {waves}: expected at least 1")
    n = max(n, -(-n_micro_batches * micro_batch_bytes // WAVE_BYTES))
    n = min(n, n_micro_batches)
    size, extra = divmod(n_micro_batches, n)
    out, start = [], 0
    for w in range(n):
        end = start + size + (w < extra)
        out.append(list(range(start, end)))
        start = end
    return out


def micro_batch_bytes(ckpt: Checkpoint, micro_batch: int, seq_len: int, dtype: str | None = None) -> int:
    """Bytes of one micro-batch's hidden states on a stage (``dtype``, the stages' --dtype, else the checkpoint's)."""
    name = dtype if dtype not in (None, "auto") else ckpt.config.get("torch_dtype", ckpt.config.get("dtype"))
    size = 2 if name in ("bfloat16", "float16") else 4
    return micro_batch * seq_len * int(ckpt.config.get("hidden_size", 0)) * size


def job_waves(ckpt: Checkpoint, n_stages: int, *, tokens: int, seq_len: int, micro_batch: int,
              waves: int | None = None, dtype: str | None = None) -> list[list[int]]:
    """The waves of a job of ``tokens`` calibration tokens whose stages run ``n_stages`` at once (at most; a
    calibration set with fewer blocks has as many waves or fewer)."""
    n_mb = -(-max(tokens // seq_len, 1) // micro_batch)
    return plan_waves(n_mb, n_stages, micro_batch_bytes(ckpt, micro_batch, seq_len, dtype), waves)


def wave_tokens(ckpt: Checkpoint, n_stages: int, *, tokens: int, seq_len: int, micro_batch: int,
                waves: int | None = None, dtype: str | None = None) -> int:
    """Tokens in a job's largest wave: the hidden states a stage keeps on its device between layers."""
    plan = job_waves(ckpt, n_stages, tokens=tokens, seq_len=seq_len, micro_batch=micro_batch, waves=waves, dtype=dtype)
    return max(map(len, plan)) * micro_batch * seq_len


def plan_stages(ckpt: Checkpoint, n_stages: int, *, micro_batch_tokens: int = 8192, act_bytes: int = 4,
                wave_tokens: int = 0) -> list[Stage]:
    layers = list(range(ckpt.num_layers))
    if not 1 <= n_stages <= len(layers):
        raise MopError(f"--stages {n_stages}: expected between 1 and the model's {len(layers)} decoder layers")
    embed = ckpt.embed_bytes
    costs = [ckpt.resident_layer_bytes.get(i, 0) for i in layers]
    costs[0] += embed
    hidden = int(ckpt.config.get("hidden_size", 0))
    # per micro-batch: hidden states in/out + one expert's output at a time + [T, E] routing tensors, and every
    # expert's output at once where the observer computes the block's output from them (up to its budget)
    activation = micro_batch_tokens * (4 * hidden + 8 * ckpt.num_experts) * act_bytes
    activation += min(ckpt.num_experts * micro_batch_tokens * hidden * act_bytes, OUTPUTS_BUDGET)
    activation += wave_tokens * hidden * act_bytes  # the wave's hidden states, resident between its layers
    # FP8 bytes of a layer: resident (dequantized, 2 bytes) less file bytes (1 byte + scales), to within its scales
    fp8 = [max(ckpt.resident_layer_bytes.get(i, 0) - ckpt.layer_bytes.get(i, 0), 0) for i in layers]
    stages = []
    for s, run in enumerate(_split(costs, n_stages)):
        stages.append(Stage(s, tuple(layers[i] for i in run), sum(costs[i] for i in run), activation,
                            max(fp8[i] for i in run)))
    return stages


def fewest_stages(ckpt: Checkpoint, device_bytes: int, *, tokens: int, seq_len: int, micro_batch: int,
                  waves: int | None = None, dtype: str | None = None, at_once: int | None = None) -> list[Stage]:
    """The plan with the fewest stages whose every memory estimate fits a GPU of ``device_bytes``; ``at_once``:
    at most that many stages run at once (rounds), whose waves the estimates count."""
    for n in range(1, ckpt.num_layers + 1):
        wave = wave_tokens(ckpt, min(n, at_once or n), tokens=tokens, seq_len=seq_len, micro_batch=micro_batch,
                           waves=waves, dtype=dtype)
        stages = plan_stages(ckpt, n, micro_batch_tokens=micro_batch * seq_len, wave_tokens=wave)
        if max(st.memory_bytes for st in stages) <= device_bytes:
            return stages
    largest = max(stages, key=lambda st: st.memory_bytes)
    raise MopError(f"no plan fits a {device_bytes / 2**30:.1f} GiB GPU: even one layer per stage needs up to "
                   f"{largest.memory_bytes / 2**30:.1f} GiB (layer {largest.layers[0]}, with its activations)")


def stage_weight_bytes(ckpt: Checkpoint, layers: list[int], first_stage: bool) -> int:
    """Resident bytes of a stage's weights: its layers (FP8 dequantized to bf16) and, on the first, the embedding."""
    return sum(ckpt.resident_layer_bytes.get(i, 0) for i in layers) + (ckpt.embed_bytes if first_stage else 0)


SELECT_SHARE = 4  # streaming: a quarter of the device stays free of layers for the selections beside the wave


def stream_budget(ckpt: Checkpoint, layers: list[int], first_stage: bool, device_bytes: int, device_name: str,
                  activation_bytes: int) -> int | None:
    """For a stage that takes a single wave: None when its layers' weights and activations fit ``device_bytes`` (it
    keeps them all), else the bytes of layer weights it may hold at once (streaming): the device less the
    activations, the first stage's embedding and a quarter for the selections beside the wave. At least its two
    largest layers (the one computing and the next loading), else a MopError."""
    if stage_weight_bytes(ckpt, layers, first_stage) + activation_bytes <= device_bytes:
        return None
    embed = ckpt.embed_bytes if first_stage else 0
    budget = device_bytes - activation_bytes - embed - device_bytes // SELECT_SHARE
    two = sum(sorted((ckpt.resident_layer_bytes.get(i, 0) for i in layers), reverse=True)[:2])
    if budget < two:
        raise MopError(f"the stage holding layers {layers[0]}-{layers[-1]} streams its layers through its GPU "
                       f"({device_name}, {device_bytes / 1e9:.1f} GB) but its two largest layers need "
                       f"{two / 1e9:.1f} GB and it has {max(budget, 0) / 1e9:.1f} GB for layers (after "
                       f"{activation_bytes / 1e9:.1f} GB of activations and a quarter kept for selection): use GPUs "
                       f"with more memory, or more stages — on fewer GPUs they run in rounds (`mop-ray plan --model M "
                       f"--gpu-memory {device_bytes / 2**30:.1f} --gpus N` gives how many)")
    return budget


def check_fits(ckpt: Checkpoint, layers: list[int], first_stage: bool, device_bytes: int, device_name: str) -> None:
    """Refuse a stage whose layers' weights alone exceed its GPU's memory: it would otherwise read and copy layers
    for minutes and then run out of memory. Weights are resident bytes (FP8 dequantized to bf16; the first stage
    adds the embedding); the advice counts the whole model's weights plus a tenth for activations."""
    need = stage_weight_bytes(ckpt, layers, first_stage)
    if need <= device_bytes:
        return
    whole = sum(ckpt.resident_layer_bytes.values()) + ckpt.embed_bytes
    gpus = -(-(whole * 11 // 10) // device_bytes)
    raise MopError(f"the stage holding layers {layers[0]}-{layers[-1]} needs {need / 1e9:.1f} GB for their weights "
                   f"but its GPU ({device_name}) has {device_bytes / 1e9:.1f} GB: the model's {whole / 1e9:.1f} GB of "
                   f"weights need at least {gpus} such GPUs (`mop-ray plan --model M --gpu-memory "
                   f"{device_bytes / 2**30:.1f}` gives the fewest stages that fit): pass --stages with that many "
                   f"(on fewer GPUs they run in rounds, as many at once as there are GPUs), or --waves 1 (a stage "
                   f"that takes one wave streams layers larger than its GPU)")


def describe(stages: list[Stage], ckpt: Checkpoint) -> str:
    lines = [f"{len(stages)} stage(s) for {ckpt.family.name} ({ckpt.num_layers} layers, {ckpt.total_bytes / 1e9:.2f} GB):"]
    moe = set(ckpt.moe_layers)
    for st in stages:
        n_moe = sum(1 for i in st.layers if i in moe)
        lines.append(f"  stage {st.index}: layers {st.layers[0]}-{st.layers[-1]} ({n_moe} MoE, {len(st.layers) - n_moe} dense)"
                     f"  weights {st.weight_bytes / 1e9:.3f} GB  est. memory {st.memory_bytes / 1e9:.3f} GB")
    if ckpt.resident_layer_bytes != ckpt.layer_bytes:
        lines.append("  (FP8 weights are dequantized to bf16 on the stages: weights above are resident bytes)")
    return "\n".join(lines)

"""`mop-ray report RUN_DIR [RUN_DIR ...]`: one HTML page with plots that explain a pruning run or a comparison.

For every run it reads ``manifest.json`` (method, keep-map, per-layer details), the layer records and the
output's ``pruning.json``; ``eval.json`` beside a run (written by ``mop-ray eval --json`` or the demo) adds
the method × domain table. Plots (PNG, matplotlib):
- routing per domain before and after pruning (MoP Fig. 3): layers × experts, mean routing weight of each
  domain's tokens; "after" routes the recorded router logits with the dropped experts masked, which is what
  the pruned model's router computes;
- for mop: K-Means domain sizes and the Spearman/Ward dendrogram of the candidate experts, per layer;
- the reconstruction loss of the chosen set per layer (enu, gvp, mop);
- sizes before/after.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from mop_ray.errors import MopError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Run:
    def __init__(self, path: Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise MopError(f"{self.path}: not a run directory (no manifest.json)")
        self.manifest = json.loads(mpath.read_text())
        phases = self.manifest.get("phases", {})
        self.select = phases.get("select") or {}
        self.method = self.select.get("method", "?")
        self.keep_map = {int(k): v for k, v in (self.select.get("keep_map") or {}).items()}
        self.details = self.select.get("details") or {}
        out = (phases.get("write") or {}).get("out")
        self.out = Path(out) if out else None
        self.pruning = json.loads((self.out / "pruning.json").read_text()) if out and (self.out / "pruning.json").exists() else {}
        ev = self.path / "eval.json"
        self.eval = json.loads(ev.read_text()) if ev.exists() else None
        self.name = self.method

    @property
    def layers(self) -> list[int]:
        return sorted(self.keep_map)


def routing_by_domain(run: Run, keep: bool) -> tuple[list[str], np.ndarray]:
    """(domains, weights [domains, layers, experts]): mean routing weight per domain, before or after pruning."""
    import torch

    from mop_ray.arch import route
    from mop_ray.checkpoint.reader import Checkpoint
    from mop_ray.observe.records import read_sample

    ckpt = Checkpoint(run.manifest.get("model") or run.pruning.get("source"))
    spec = ckpt.family.router_spec(ckpt.config)
    n = ckpt.num_experts
    per_layer, domains = [], None
    for layer in run.layers:
        sample = read_sample(run.path, layer)
        logits = torch.tensor(sample.logits)
        bias = None
        if spec.has_correction_bias:
            from safetensors import safe_open

            name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
            with safe_open(ckpt.tensors[name].path, "pt") as f:
                bias = f.get_tensor(name).float()
        mask = None
        if keep:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[run.keep_map[layer]] = True
        idx, w = route(spec, logits, bias, keep=mask)
        dense = torch.zeros(len(logits), n).scatter_add_(1, idx, w.float())  # [N, E]
        srcs = np.array(sample.source)
        domains = domains or sorted(set(sample.source))
        per_layer.append(np.stack([dense[torch.from_numpy(srcs == d)].mean(0).numpy() for d in domains]))
    return domains, np.stack(per_layer, axis=1)  # [D, L, E]


def plot_routing(run: Run, out: Path) -> str:
    plt = _plt()
    domains, before = routing_by_domain(run, keep=False)
    _, after = routing_by_domain(run, keep=True)
    fig, axes = plt.subplots(len(domains), 2, figsize=(8, 1.6 * len(domains) + 0.8), squeeze=False)
    vmax = max(before.max(), after.max())
    for d, dom in enumerate(domains):
        for col, (mat, title) in enumerate(((before[d], "all experts"), (after[d], "after pruning"))):
            ax = axes[d][col]
            im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_ylabel(dom, fontsize=8)
            ax.set_yticks(range(len(run.layers)), run.layers, fontsize=6)
            ax.set_xticks(range(mat.shape[1]), range(mat.shape[1]), fontsize=6)
            if d == 0:
                ax.set_title(f"{title}: mean routing weight", fontsize=9)
            if col == 1:
                for li, layer in enumerate(run.layers):
                    for e in range(mat.shape[1]):
                        if e not in run.keep_map[layer]:
                            ax.add_patch(plt.Rectangle((e - 0.5, li - 0.5), 1, 1, fill=True, color="white", alpha=0.85))
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.supxlabel("expert", fontsize=8)
    name = f"routing_{run.name}.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def plot_mop(run: Run, out: Path) -> str | None:
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.stats import rankdata

    layers = [l for l in run.layers if "performance" in run.details.get(str(l), {})]
    if not layers:
        return None
    plt = _plt()
    shown = layers[:6]
    fig, axes = plt.subplots(2, len(shown), figsize=(2.8 * len(shown), 5), squeeze=False)
    for j, layer in enumerate(shown):
        det = run.details[str(layer)]
        axes[0][j].bar(range(len(det["domain_sizes"])), det["domain_sizes"], color="tab:blue")
        axes[0][j].set_title(f"layer {layer}: K-Means domains", fontsize=8)
        perf = np.array(det["performance"])
        cand = [e for e in range(len(perf)) if e not in det["general"]]
        ax = axes[1][j]
        if len(cand) >= 2:
            ranks = np.apply_along_axis(rankdata, 1, perf[cand])
            centred = ranks - ranks.mean(1, keepdims=True)
            norm = np.linalg.norm(centred, axis=1, keepdims=True)
            rt = np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)
            dendrogram(linkage(rt, "ward"), labels=[str(e) for e in cand], ax=ax, color_threshold=0)
            for lbl in ax.get_xticklabels():
                if int(lbl.get_text()) in det["specialists"]:
                    lbl.set_color("tab:red")
                    lbl.set_fontweight("bold")
        ax.set_title("Ward on Spearman ranks\n(red: kept specialists)", fontsize=8)
    name = f"mop_{run.name}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_losses(runs: list[Run], out: Path) -> str | None:
    series = {}
    for run in runs:
        pts = []
        for layer in run.layers:
            det = run.details.get(str(layer), {})
            loss = (det.get("enu") or det).get("loss")  # mop/gvp: their general set; enu: the chosen set
            if loss is not None:
                pts.append((layer, loss))
        if pts:
            series[run.name] = pts
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("reconstruction loss of the\ngeneral / chosen set (Eq. 3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)
    return "losses.png"


def plot_zoo(zoo: dict, out: Path, name: str = "zoo_routing.png") -> str:
    """A trained zoo model's expert usage per domain and layer (from its zoo.json), with routing entropy."""
    plt = _plt()
    domains = list(zoo["usage"])
    layers = list(zoo["usage"][domains[0]])
    cols = min(len(layers), 6)  # a grid, six layers a row: smol-moe has 30
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, (2.2 + 0.2 * len(domains)) * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for j, layer in enumerate(layers):
        mat = np.array([zoo["usage"][d][layer] for d in domains])  # [D, E]
        ax = axes[j // cols][j % cols]
        ax.imshow(mat, aspect="auto", cmap="magma", vmin=0)
        ent = [zoo["entropy_bits"][d][layer] for d in domains]
        ax.set_yticks(range(len(domains)), [f"{d} ({e:.1f} b)" for d, e in zip(domains, ent)], fontsize=7)
        ax.set_title(f"layer {layer}: share of routed slots (0 to {mat.max():.2f})", fontsize=8)  # colour per panel
        ax.set_xlabel("expert", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def eval_table(runs: list[Run], baseline: dict | None) -> str:
    rows = ([("unpruned", baseline)] if baseline else []) + [(r.name, r.eval) for r in runs if r.eval]
    if not rows:
        return "<p>No evaluation results (run <code>mop-ray eval</code> and save <code>eval.json</code> in the run dir).</p>"
    domains = sorted({d for _, ev in rows for d in ev.get("perplexity", {})})
    tasks = sorted({t for _, ev in rows for t in ev.get("multiple_choice", {})})
    head = "".join(f"<th>{html.escape(d)} ppl</th>" for d in domains) + "".join(f"<th>{html.escape(t)} acc</th>" for t in tasks)
    body = []
    for name, ev in rows:
        cells = "".join(f"<td>{ev['perplexity'][d]['ppl']:.2f}</td>" if d in ev.get("perplexity", {}) else "<td>-</td>" for d in domains)
        cells += "".join(f"<td>{ev['multiple_choice'][t]['acc']:.3f}</td>" if t in ev.get("multiple_choice", {}) else "<td>-</td>" for t in tasks)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


def build_report(run_dirs: list[str | Path], out: str | Path | None = None, baseline: dict | None = None,
                 title: str = "mop-ray pruning report") -> Path:
    runs = [Run(Path(p)) for p in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # distinct names when one method appears twice
        if names.count(r.name) > 1:
            r.name = f"{r.method}-{r.path.name}"
    out = Path(out) if out else runs[0].path
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    first = runs[0].pruning
    if first:
        after = first.get("experts_after")
        if isinstance(after, dict):  # non-uniform (C-Prune global): a count per layer
            after = f"{min(after.values())}–{max(after.values())} (different per layer: {after})"
        parts.append(f"<p>Model <code>{html.escape(first.get('source', '?'))}</code> ({first.get('family')}): "
                     f"{first.get('experts_before')} → {html.escape(str(after))} experts per MoE layer.</p>")
    parts.append("<h2>Quality per domain</h2>" + eval_table(runs, baseline))
    zoo = Path(runs[0].manifest.get("model", "")) / "zoo.json"
    if zoo.exists():
        parts.append("<h2>The model's routing by domain (after training)</h2><p>Expert usage per domain on held-out "
                     "text, with the routing entropy in bits: experts that specialise show as uneven rows.</p>"
                     f"<img src='{plot_zoo(json.loads(zoo.read_text()), out)}'>")
    size_rows = "".join(
        f"<tr><th>{html.escape(r.name)}</th><td>{r.pruning.get('bytes_before', 0) / 1e6:.1f} MB</td>"
        f"<td>{r.pruning.get('bytes_after', 0) / 1e6:.1f} MB</td></tr>" for r in runs if r.pruning)
    parts.append(f"<h2>Size</h2><table><tr><th>method</th><th>before</th><th>after</th></tr>{size_rows}</table>")
    if (img := plot_losses(runs, out)):
        parts.append(f"<h2>Reconstruction loss per layer</h2><img src='{img}'>")
    for r in runs:
        parts.append(f"<h2>{html.escape(r.name)}</h2><p>Kept experts per layer: "
                     + ", ".join(f"{l}: {r.keep_map[l]}" for l in r.layers) + "</p>")
        parts.append(f"<img src='{plot_routing(r, out)}'>")
        if (img := plot_mop(r, out)):
            parts.append(f"<img src='{img}'>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = out / "report.html"
    path.write_text(page)
    return path

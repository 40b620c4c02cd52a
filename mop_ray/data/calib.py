"""Calibration data: a weighted mixture of sources, tokenized and packed into fixed-length blocks.

``--calib SPEC`` is one of:
- ``default``: the embedded six-domain corpus (code, docs, wiki, literature, math, qa), equal weights;
- a text/jsonl/json/parquet file (optionally .gz), or a folder of them (one source per file);
- a mixture YAML: ``sources: [{name, path | hf | default, weight, split, text_field}]``;
- a Hugging Face dataset name (needs network; offline it fails with a clear message).

Each source is loaded with ``datasets`` (local builders or the Hub), shuffled with the seed, tokenized with
the model's tokenizer, concatenated with EOS between documents and cut into ``seq_len`` blocks without
padding. Block counts follow the weights; every block keeps its source label. The result is
``calib.parquet`` (columns ``input_ids: list<int32>``, ``source: string``), the provenance and resume record.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mop_ray.errors import MopError

DOMAINS = ("code", "docs", "wiki", "literature", "math", "qa")
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    name: str  # label written to calib.parquet and the records
    kind: str  # "file" | "hf" | "default"
    target: str  # path, dataset id, or embedded domain
    weight: float = 1.0
    split: str = "train"
    text_field: str = "text"


def embedded_path(domain: str, split: str = "train") -> Path:
    if domain not in DOMAINS:
        raise MopError(f"embedded corpus: unknown domain {domain!r}; available: {', '.join(DOMAINS)}")
    return Path(str(resources.files("mop_ray.data") / "corpus" / f"{domain}.{split}.jsonl.gz"))


def _builder(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    builder = BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise MopError(f"--calib {path}: expected a .txt/.jsonl/.json/.parquet file (optionally .gz), found {path.name}")
    return builder


def parse_spec(spec: str, split: str = "train") -> list[Source]:
    """The sources named by ``--calib SPEC`` (see module doc); ``split`` applies to embedded/Hub sources."""
    if spec == "default":
        return [Source(d, "default", d, split=split) for d in DOMAINS]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        return _parse_mixture(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        usable = [p for p in files if [s for s in p.suffixes if s != ".gz"][-1:] and _known(p)]
        if not usable:
            raise MopError(f"--calib {path}: no .txt/.jsonl/.json/.parquet files in this folder")
        return [Source(p.relative_to(path).as_posix().split(".")[0], "file", str(p)) for p in usable]
    if path.exists():
        _builder(path)
        return [Source(path.name.split(".")[0], "file", str(path))]
    if spec.startswith((".", "/", "~")) or _known(path) or path.suffix in (".yaml", ".yml"):
        raise MopError(f"--calib {spec}: no such file or folder")
    return [Source(spec.replace("/", "_"), "hf", spec, split=split)]


def _known(p: Path) -> bool:
    try:
        _builder(p)
        return True
    except MopError:
        return False


def _parse_mixture(path: Path) -> list[Source]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MopError(f"--calib {path}: no such file") from None
    except yaml.YAMLError as e:
        raise MopError(f"--calib {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    items = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise MopError(f"--calib {path}: expected a mapping with a non-empty 'sources' list")
    out = []
    allowed = {"name", "path", "hf", "default", "weight", "split", "text_field"}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MopError(f"--calib {path}: sources[{i}] must be a mapping, found {item!r}")
        unknown = set(item) - allowed
        if unknown:
            raise MopError(f"--calib {path}: sources[{i}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        kinds = [k for k in ("path", "hf", "default") if k in item]
        if len(kinds) != 1:
            raise MopError(f"--calib {path}: sources[{i}] needs exactly one of path/hf/default, found {kinds or 'none'}")
        kind = kinds[0]
        target = str(item[kind])
        if kind == "path":
            target = str((path.parent / target).resolve()) if not Path(target).is_absolute() else target
            _builder(Path(target))
        if kind == "default":
            embedded_path(target)
        weight = item.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise MopError(f"--calib {path}: sources[{i}] weight must be a positive number, found {weight!r}")
        name = str(item.get("name") or Path(target).name.split(".")[0])
        out.append(Source(name, "file" if kind == "path" else kind, target, float(weight),
                          str(item.get("split", "train")), str(item.get("text_field", "text"))))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise MopError(f"--calib {path}: source names must be unique, found {names}")
    return out


def load_source(src: Source):
    """A ``datasets.Dataset`` with one column ``text``."""
    import datasets

    try:
        if src.kind == "hf":
            ds = datasets.load_dataset(src.target, split=src.split)
        else:
            path = embedded_path(src.target, src.split) if src.kind == "default" else Path(src.target)
            if not path.exists():
                raise MopError(f"calibration source {src.name}: no such file {path}")
            ds = datasets.load_dataset(_builder(path), data_files=str(path), split="train")
    except MopError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        hint = " (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set or there is no network)" if src.kind == "hf" else ""
        raise MopError(f"calibration source {src.name!r} ({src.target}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}") from None
    field = src.text_field
    if field not in ds.column_names:
        raise MopError(f"calibration source {src.name!r}: no column {field!r}; columns are {ds.column_names}")
    return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])


def block_counts(sources: list[Source], n_blocks: int) -> list[int]:
    """Blocks per source, proportional to the weights (largest remainder), each source at least one."""
    total = sum(s.weight for s in sources)
    exact = [n_blocks * s.weight / total for s in sources]
    counts = [max(1, int(x)) for x in exact]
    order = sorted(range(len(sources)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < n_blocks:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts


def build_calibration(spec: str, tokenizer, *, tokens: int, seq_len: int, seed: int = 0, out: str | Path | None = None):
    """Tokenize and pack the mixture into ``tokens // seq_len`` blocks; write ``out`` (Parquet) if given.

    Returns a ``datasets.Dataset`` with columns ``input_ids`` (seq_len int32) and ``source``.
    """
    import datasets

    datasets.disable_progress_bars()
    if seq_len < 2 or tokens < seq_len:
        raise MopError(f"--tokens {tokens} / --seq-len {seq_len}: need seq_len >= 2 and at least one block of seq_len tokens")
    sources = parse_spec(spec)
    n_blocks = tokens // seq_len
    if n_blocks < len(sources):
        raise MopError(f"--tokens {tokens}: gives {n_blocks} blocks of {seq_len}, fewer than the {len(sources)} sources")
    eos = tokenizer.eos_token_id

    parts = []
    for src, want in zip(sources, block_counts(sources, n_blocks)):
        docs = load_source(src).shuffle(seed=seed)
        need = want * seq_len
        ids: list[int] = []
        for start in range(0, len(docs), 32):  # tokenize only as many documents as the blocks need
            for text in docs[start:start + 32]["text"]:
                if text and len(ids) < need:
                    ids.extend(tokenizer(text[: 8 * (need - len(ids)) + 64], add_special_tokens=False)["input_ids"])
                    if eos is not None:
                        ids.append(eos)
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise MopError(
                f"calibration source {src.name!r} gives {len(ids) // seq_len} blocks of {seq_len} tokens; {want} needed "
                f"(lower --tokens or --seq-len, or lower its weight)"
            )
        blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(want)]
        parts.append(datasets.Dataset.from_dict({"input_ids": blocks, "source": [src.name] * want}))
    calib = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    calib = calib.cast(datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")), "source": datasets.Value("string")}))
    if out is not None:
        calib.to_parquet(str(out))
    return calib

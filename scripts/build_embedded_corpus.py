"""Build the embedded default corpus (mop_ray/data/corpus/) from the project's six-domain corpus.

    python scripts/build_embedded_corpus.py ../shared/data/corpus

Deterministic: documents are taken in file order (the source is already shuffled with a fixed seed) until
each domain's character cap; long documents are cut at MAX_DOC_CHARS. The Lee news articles are left out
because no license is stated for them (see SOURCES.md).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

DOMAINS = ("code", "docs", "wiki", "literature", "math", "qa")
CAPS = {"train": 1_200_000, "valid": 60_000}  # characters per domain and split
MAX_DOC_CHARS = 60_000
EXCLUDED_SOURCES = ("gensim:test_data/lee",)


def main(src: str, dst: str = "mop_ray/data/corpus") -> None:
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for domain in DOMAINS:
        for split, cap in CAPS.items():
            rows, chars = [], 0
            with gzip.open(Path(src) / domain / f"{split}.jsonl.gz", "rt") as f:
                for line in f:
                    doc = json.loads(line)
                    if doc["source"].startswith(EXCLUDED_SOURCES):
                        continue
                    text = doc["text"][:MAX_DOC_CHARS]
                    if chars + len(text) > cap:
                        text = text[: cap - chars]
                    if len(text) < 200:
                        break
                    rows.append({"text": text, "source": doc["source"]})
                    chars += len(text)
            path = out / f"{domain}.{split}.jsonl.gz"
            with gzip.GzipFile(path, "wb", mtime=0) as g:
                g.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
            stats[f"{domain}.{split}"] = {"docs": len(rows), "chars": chars, "gz_bytes": path.stat().st_size}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1), sum(s["gz_bytes"] for s in stats.values()))


if __name__ == "__main__":
    main(*sys.argv[1:])

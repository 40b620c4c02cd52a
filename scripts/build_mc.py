"""Build the embedded multiple-choice sets (mop_ray/data/mc/*.jsonl). Deterministic: python scripts/build_mc.py

arithmetic: "Question: What is A plus B?\\nAnswer:" in the BIG-bench arithmetic format the math domain uses,
with the right sum and three near misses (off by one, by ten, digits swapped) as choices. Freshly generated
2-3 digit problems (seed 1234), so exact overlap with the calibration corpus is unlikely but not excluded.
"""

import json
import random
from pathlib import Path


def arithmetic(n: int = 200, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        op, word = rng.choice([("+", "plus"), ("-", "minus")])
        right = a + b if op == "+" else a - b
        wrong = {right + 1, right - 10, int(str(abs(right))[::-1]) * (1 if right >= 0 else -1), right + 100}
        wrong.discard(right)
        choices = [right] + sorted(wrong)[:3]
        if len(choices) < 4:
            continue
        rng.shuffle(choices)
        items.append({"question": f"Question: What is {a} {word} {b}?\nAnswer:", "choices": [f" {c}" for c in choices],
                      "answer_index": choices.index(right)})
    return items


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "mop_ray" / "data" / "mc"
    out.mkdir(parents=True, exist_ok=True)
    (out / "arithmetic.jsonl").write_text("".join(json.dumps(i) + "\n" for i in arithmetic()))
    print(f"wrote {out / 'arithmetic.jsonl'}")

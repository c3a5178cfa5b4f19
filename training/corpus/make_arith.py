"""Generate the shipped arithmetic dataset: ``arith_train.jsonl`` and ``arith_heldout.jsonl``.

Three kinds of question, each answered with the bare number (no working, no words)::

    What is 47 + 38?  → 85        two 2-digit numbers
    What is 91 - 56?  → 35        two 2-digit numbers (either order: answers can be negative)
    What is 47 * 8?   → 376       a 2-digit and a 1-digit number (2..9)

SmolLM2-135M-Instruct does not answer with the bare number: it starts explaining ("To add 74 and
60, we need to ...") and on 32 probes (16 additions, 16 multiplications by a digit, greedy, 24 new
tokens) never reached the right number; its held-out accuracy is measured by ``bench/converge.py``
(docs/training.md). The held-out split shares no (a, op, b) triple with the
training split. Deterministic: ``python -m training.corpus.make_arith`` rewrites identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def all_questions() -> list[tuple[int, str, int]]:
    """Every (a, op, b) triple the generator can draw from."""
    items = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    items += [(a, "*", b) for a in range(10, 100) for b in range(2, 10)]
    return items


def record(a: int, op: str, b: int) -> dict[str, str]:
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return {"prompt": f"What is {a} {op} {b}?", "response": str(answer)}


def make(train: int = 800, heldout: int = 100, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Draw ``train + heldout`` distinct questions, a third of each kind, and split them."""
    rng = random.Random(seed)
    by_op = {op: [q for q in all_questions() if q[1] == op] for op in "+-*"}
    picked: list[tuple[int, str, int]] = []
    total = train + heldout
    for i, op in enumerate("+-*"):
        n = total // 3 + (1 if i < total % 3 else 0)
        picked += rng.sample(by_op[op], n)
    rng.shuffle(picked)
    records = [record(*q) for q in picked]
    return records[:train], records[train:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    train, heldout = make(args.train, args.heldout, args.seed)
    for name, rows in (("arith_train.jsonl", train), ("arith_heldout.jsonl", heldout)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} records to {args.out / name}")


if __name__ == "__main__":
    main()

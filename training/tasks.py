"""The shipped task (arithmetic, answered with the bare number) and its held-out accuracy metric.

Accuracy = share of held-out prompts whose greedy answer's first integer equals the reference
(``"The answer is 85."`` counts as 85; no integer, or another one first, is wrong).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "corpus"
ARITH_TRAIN = CORPUS / "arith_train.jsonl"
ARITH_HELDOUT = CORPUS / "arith_heldout.jsonl"

_INT = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """First integer in ``text`` (thousands separators removed), or ``None``."""
    match = _INT.search(text.replace(",", ""))
    return int(match.group()) if match else None


def is_correct(text: str, reference: str) -> bool:
    expected = extract_answer(reference)
    return expected is not None and extract_answer(text) == expected


@dataclass(frozen=True)
class Accuracy:
    """Held-out accuracy and the answers it was computed from."""

    correct: int
    total: int
    answers: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Greedy answers to single-turn ``prompts`` (chat template, left padding, batched)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def accuracy(model: Any, tokenizer: Any, records: list[dict[str, str]], *, max_new_tokens: int = 8,
             batch_size: int = 16) -> Accuracy:
    """Held-out accuracy of ``model`` on prompt/response ``records`` (see the module docstring)."""
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    correct = sum(is_correct(a, r["response"]) for a, r in zip(answers, records))
    return Accuracy(correct=correct, total=len(records), answers=tuple(answers))

"""The shipped arithmetic dataset and its accuracy metric."""

from __future__ import annotations

import re

import pytest

from training.corpus import make_arith
from training.data import read_records
from training.tasks import ARITH_HELDOUT, ARITH_TRAIN, accuracy, extract_answer, is_correct


def test_shipped_files_are_what_the_script_generates(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["make_arith", "--out", str(tmp_path)])
    make_arith.main()
    for path in (ARITH_TRAIN, ARITH_HELDOUT):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"regenerate {path.name}"


def test_splits_are_valid_disjoint_and_correct():
    train, heldout = read_records(ARITH_TRAIN), read_records(ARITH_HELDOUT)
    assert (len(train), len(heldout)) == (800, 100)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for r in train + heldout:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", r["prompt"]).groups()
        assert int(r["response"]) == eval(f"{a} {op} {b}")  # noqa: S307 - digits and one operator
    ops = [r["prompt"].split()[3] for r in heldout]
    assert min(ops.count(op) for op in "+-*") >= 20


@pytest.mark.parametrize(("text", "value"), [("85", 85), ("The answer is -12.", -12), ("1,024 apples", 1024),
                                             ("no number", None), ("12 * 3 = 36", 12)])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_is_correct():
    assert is_correct("85", "85") and is_correct(" 85<end>", "85")
    assert not is_correct("To add 40 and 45 ...", "85") and not is_correct("", "85")


def test_accuracy_uses_greedy_chat_answers(tiny_llama):
    """accuracy() renders the chat template, decodes only new tokens, and scores them."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    replies = iter(["12", "oops 8"])

    class Fake:
        device = torch.device("cpu")

        def generate(self, input_ids, attention_mask, **kwargs):
            assert kwargs["do_sample"] is False and tok.padding_side == "left"
            new = [tok(next(replies), add_special_tokens=False)["input_ids"] for _ in range(len(input_ids))]
            width = max(len(n) for n in new)
            rows = [n + [tok.pad_token_id] * (width - len(n)) for n in new]
            return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    result = accuracy(Fake(), tok, [{"prompt": "What is 3 * 4?", "response": "12"},
                                    {"prompt": "What is 2 + 5?", "response": "7"}], batch_size=1)
    assert (result.correct, result.total, result.accuracy) == (1, 2, 0.5)
    assert result.answers == ("12", "oops 8") and tok.padding_side == "right"

"""Training data: formats, every malformed line reported as file:line, loss masks on responses only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pissa.core.errors import SourceNotFoundError, TrainingDataError
from training.data import IGNORE_INDEX, Collator, encode_record, encode_records, read_records


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_reads_both_formats_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "response": "b"},
        "",
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "x"}]},
    ])
    assert len(read_records(path)) == 2


def test_every_malformed_line_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "response": "fine"},
        "{not json",
        {"prompt": "no response"},
        {"prompt": "x", "response": ""},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "?"}, {"role": "assistant", "content": "a"}]},
        [1, 2],
        {"text": "unknown keys"},
    ])
    with pytest.raises(TrainingDataError) as err:
        read_records(path)
    problems = err.value.problems()
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    assert "invalid JSON" in problems[0]
    assert "missing 'response'" in problems[1]
    assert "'response' is empty" in problems[2]
    assert "no non-empty assistant message" in problems[3]
    assert "unknown role 'robot'" in problems[4]
    assert "expected a JSON object" in problems[5]
    assert "expected keys 'prompt' and 'response', or 'messages'" in problems[6]


def test_empty_and_missing_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TrainingDataError, match="no records"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(SourceNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_loss_only_on_response_tokens(tokenizer):
    """The labelled tokens decode to exactly the response plus the template's end-of-turn marker."""
    ex = encode_record(tokenizer, {"prompt": "What is 7 times 8?", "response": "Answer: 56"})
    kept = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "Answer: 56<|end|>"
    assert tokenizer.decode(list(ex.input_ids)) == "<|user|>What is 7 times 8?<|end|><|assistant|>Answer: 56<|end|>"
    # Labelled positions are exactly the tail of the sequence here.
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert all(t != IGNORE_INDEX for t in ex.labels[first:])


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello world!"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "The quick fox"},
    ]
    ex = encode_record(tokenizer, {"messages": messages})
    kept = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert kept == "Hello world!<|end|>The quick fox<|end|>"


def test_without_chat_template(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ex = encode_record(plain, {"prompt": "7 times 8 =", "response": " 56"})
    assert plain.decode([t for t in ex.labels if t != IGNORE_INDEX]) == " 56<|end|>"
    # A token straddling the prompt/response boundary (" 56" here) is trained: it predicts response text.
    ex = encode_record(plain, {"prompt": "7 times 8 = ", "response": "56"})
    assert plain.decode([t for t in ex.labels if t != IGNORE_INDEX]) == " 56<|end|>"
    with pytest.raises(TrainingDataError, match="chat template"):
        encode_record(plain, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


def test_overlong_dropped_or_truncated_and_counted(tokenizer):
    records = [{"prompt": "Hi", "response": "ok"}, {"prompt": "Hello world! " * 20, "response": "long one"}]
    examples, stats = encode_records(tokenizer, records, max_length=24, overlong="drop", path="x")
    assert (stats.examples, stats.dropped_overlong, stats.truncated) == (1, 1, 0)
    examples, stats = encode_records(tokenizer, records, max_length=24, overlong="truncate", path="x")
    # Truncated in the prompt: no response token left, so it is dropped too (and counted as such).
    assert (stats.examples, stats.truncated, stats.dropped_no_target) == (1, 1, 1)
    with pytest.raises(TrainingDataError, match="all 2 records are longer than --max-length 3"):
        encode_records(tokenizer, records, max_length=3, overlong="drop", path="x")


def test_collator_pads_labels_with_ignore_index(tokenizer):
    examples, _ = encode_records(tokenizer, [{"prompt": "Hi", "response": "ok"},
                                             {"prompt": "Hello world", "response": "fine then"}],
                                 max_length=64, overlong="drop")
    batch = Collator(pad_token_id=1)(examples)
    short = min(range(2), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["input_ids"][short, n:] == 1).all()


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]).save_to_disk(
        str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds") == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "notds").mkdir()
    with pytest.raises(TrainingDataError, match="not a saved datasets folder"):
        read_records(tmp_path / "notds")

"""Training data: read JSONL (or a saved HF ``datasets`` folder), validate, tokenize with loss masks.

Formats, one JSON object per line:

- ``{"prompt": str, "response": str}``: one user turn and the assistant's answer;
- ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``: a
  conversation with at least one assistant turn.

Both are rendered with the tokenizer's chat template (``prompt``/``response`` become a user and an
assistant message; a tokenizer without a template gets ``prompt + response + eos``). The loss is
taken on assistant tokens only: every token overlapping the characters an assistant turn adds to the
rendered text (its content and the template's end-of-turn marker) keeps its label; all others get
-100. Malformed records are all reported at once as ``file:line: what is wrong``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import MissingDependencyError, SourceNotFoundError, TrainingDataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED = 20


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``labels[i]`` is ``input_ids[i]`` where the loss is taken, else -100."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class DataStats:
    """What happened to the records of one data source."""

    path: str
    records: int
    examples: int
    truncated: int
    dropped_overlong: int
    dropped_no_target: int
    tokens: int
    target_tokens: int


def record_problem(record: Any) -> str | None:
    """What is wrong with one parsed record (``None`` if it is usable)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"messages[{i}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            return "no non-empty assistant message to learn from"
        return None
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                return f"{key!r} must be a string" if key in record else f"missing {key!r}"
        if not record["response"]:
            return "'response' is empty"
        return None
    return "expected keys 'prompt' and 'response', or 'messages'"


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A validated record as chat messages."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate every record of a JSONL file or a ``datasets.save_to_disk`` folder.

    Raises:
        SourceNotFoundError: the path does not exist.
        TrainingDataError: malformed lines (all of them, as ``file:line: problem``) or no records.
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"data {p} does not exist", path=str(p), fix="pass a JSONL file or a datasets folder")
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    if p.is_dir():
        for i, record in enumerate(_read_dataset_folder(p)):
            problem = record_problem(record)
            if problem:
                problems.append(f"{p}: row {i}: {problem}")
            else:
                records.append(record)
    else:
        with p.open(encoding="utf-8", errors="strict") as f:
            try:
                lines = f.read().splitlines()
            except UnicodeDecodeError as exc:
                raise TrainingDataError(f"{p}: not UTF-8 text", [f"{p}: not UTF-8 text ({exc})"],
                                        fix="pass a UTF-8 JSONL file") from exc
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            problem = record_problem(record)
            if problem:
                problems.append(f"{p}:{lineno}: {problem}")
            else:
                records.append(record)
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"{p}: ... and {len(problems) - MAX_REPORTED} more malformed records")
        raise TrainingDataError(f"{p}: {len(problems)} malformed records", shown,
                                fix="fix these records (see docs/training.md for the formats)")
    if not records:
        raise TrainingDataError(f"{p}: no records", [f"{p} holds no records"], fix="pass a non-empty data file")
    return records


def _read_dataset_folder(path: Path) -> list[Any]:
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError("datasets", extra="data", purpose="to read a saved datasets folder") from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / its own errors for non-dataset folders
        raise TrainingDataError(f"{path}: not a saved datasets folder", [f"{path}: not a saved datasets folder ({exc})"],
                                fix="pass a JSONL file or a folder written by Dataset.save_to_disk") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise TrainingDataError(f"{path}: DatasetDict without a 'train' split",
                                    [f"{path}: splits are {', '.join(ds)}; expected 'train'"])
        ds = ds["train"]
    return list(ds)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text of ``messages`` and the character spans each assistant turn adds to it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise TrainingDataError(
                "the chat template does not render conversations incrementally",
                ["cannot locate assistant turns: the template renders a prefix of the conversation differently"],
                fix="use a tokenizer whose chat template renders prefixes consistently",
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_record(tokenizer: Any, record: dict[str, Any]) -> Example:
    """Tokenize one validated record with labels on assistant tokens only (no length limit)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if has_template:
        text, spans = _assistant_spans(tokenizer, to_messages(record))
    elif "messages" in record:
        raise TrainingDataError("the tokenizer has no chat template", ["'messages' records need a chat template"],
                                fix="use prompt/response records or a tokenizer with a chat template")
    else:
        eos = tokenizer.eos_token or ""
        text = record["prompt"] + record["response"] + eos
        spans = [(len(record["prompt"]), len(text))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return Example(tuple(ids), tuple(labels))


def encode_records(
    tokenizer: Any, records: list[dict[str, Any]], *, max_length: int, overlong: str, path: str = ""
) -> tuple[list[Example], DataStats]:
    """Tokenize records; drop or truncate those longer than ``max_length`` (counted in the stats).

    Raises:
        TrainingDataError: nothing usable is left.
    """
    examples: list[Example] = []
    truncated = dropped_long = dropped_none = 0
    for record in records:
        ex = encode_record(tokenizer, record)
        if len(ex.input_ids) > max_length:
            if overlong == "drop":
                dropped_long += 1
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
            truncated += 1
        if all(label == IGNORE_INDEX for label in ex.labels):
            dropped_none += 1
            continue
        examples.append(ex)
    stats = DataStats(
        path=path,
        records=len(records),
        examples=len(examples),
        truncated=truncated,
        dropped_overlong=dropped_long,
        dropped_no_target=dropped_none,
        tokens=sum(len(e.input_ids) for e in examples),
        target_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples),
    )
    if dropped_long or truncated or dropped_none:
        logger.warning("%s: %d longer than --max-length %d were %s; %d had no response tokens left and were dropped",
                       path, dropped_long + truncated, max_length, "dropped" if overlong == "drop" else "truncated",
                       dropped_none)
    if not examples:
        raise TrainingDataError(
            f"{path}: no usable examples",
            [f"{path}: all {len(records)} records are longer than --max-length {max_length} or have no response tokens"],
            fix="raise --max-length" + (" or use --overlong truncate" if overlong == "drop" else ""),
        )
    return examples, stats


class Collator:
    """Right-pads a batch of :class:`Example` into tensors (labels padded with -100)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[Example]) -> dict[str, Any]:
        import torch

        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

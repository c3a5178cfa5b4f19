"""Generic YAML manifest loading with line numbers, and helpers to validate into frozen dataclasses.

Every manifest in ``manifests/`` (zoo, serve, ...) is read the same way:

1. :func:`load_yaml` parses the file into plain Python data *and* remembers the line of every key
   path (``("entries", 1, "rank")`` -> 12), so a problem can be reported as
   ``line 12: entries[1].rank: must be >= 1, got 0``. Syntax errors and duplicate keys become a
   :class:`~pissa.core.errors.ManifestError` with their line.
2. A :class:`Problems` collector and :class:`Node` readers turn the data into typed values. The
   readers never raise on bad input: they record a problem and return a fallback, so one pass over
   the document finds every problem; :meth:`Problems.raise_if_any` then raises one
   :class:`~pissa.core.errors.ManifestError` listing them all.

Example (a manifest with a ``name`` and an optional list of ranks)::

    doc = load_yaml(path)
    problems = Problems(doc)
    root = problems.root()
    name = root.get_str("name", required=True)
    ranks = root.int_list("ranks", default=[16], minimum=1)
    root.reject_unknown({"name", "ranks"})
    problems.raise_if_any()

This module knows nothing about zoos or serving; their dataclasses live with their features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pissa.core.errors import ManifestError

KeyPath = tuple[str | int, ...]
T = TypeVar("T")

_MISSING: Any = object()


@dataclass(frozen=True)
class Document:
    """A parsed YAML file: its data and the line (1-based) of every key path in it.

    Attributes:
        path: the file it was read from (as given; used in messages).
        data: the plain Python data (dicts, lists, scalars).
        lines: key path -> line of the key (for mapping members) or of the item (for list items).
    """

    path: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, key_path: KeyPath) -> int | None:
        """Line of ``key_path``, or of its nearest ancestor that has one (None for an empty file)."""
        kp = tuple(key_path)
        while True:
            if kp in self.lines:
                return self.lines[kp]
            if not kp:
                return None
            kp = kp[:-1]


def format_key_path(key_path: KeyPath) -> str:
    """``("entries", 1, "rank")`` -> ``entries[1].rank`` (``<top level>`` for the root)."""
    out = ""
    for part in key_path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def parse_yaml(text: str, path: str = "<string>") -> Document:
    """Parse YAML ``text`` into a :class:`Document` (see :func:`load_yaml`)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise ManifestError(
                path, [f"{where}YAML syntax error: {exc.problem or exc}"], fix="fix the YAML syntax"
            ) from None
        except yaml.YAMLError as exc:
            raise ManifestError(path, [f"YAML error: {exc}"], fix="fix the YAML syntax") from None
        lines: dict[KeyPath, int] = {}
        problems: list[str] = []
        if node is None:
            return Document(path, None, {(): 1})
        data = _build(loader, node, (), lines, problems)
    finally:
        loader.dispose()
    if problems:
        raise ManifestError(path, problems, fix="fix the YAML above")
    return Document(path, data, lines)


def load_yaml(path: str | Path) -> Document:
    """Read a YAML manifest, keeping the line of every key path.

    Raises:
        ManifestError: the file is missing or unreadable, has a syntax error (with its line), or
            repeats a key in one mapping (every repetition listed).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(str(path), ["file not found"], fix="check the manifest path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), [f"cannot read: {exc}"], fix="check the manifest file") from None
    return parse_yaml(text, str(path))


def _build(loader: Any, node: Any, kp: KeyPath, lines: dict[KeyPath, int], problems: list[str]) -> Any:
    import yaml

    lines.setdefault(kp, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<: *anchor)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                problems.append(f"line {key_node.start_mark.line + 1}: {format_key_path(kp)}: keys must be scalars")
                continue
            if key in out:
                problems.append(
                    f"line {key_node.start_mark.line + 1}: {format_key_path((*kp, str(key)))}: duplicate key "
                    f"(first on line {lines.get((*kp, str(key)), '?')})"
                )
                continue
            child = (*kp, str(key))
            lines[child] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, child, lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*kp, i), lines, problems) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


# --- validation ---------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


class Problems:
    """Collects every problem found while validating one :class:`Document`."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.items: list[str] = []

    def add(self, key_path: KeyPath, message: str) -> None:
        """Record ``message`` about ``key_path`` (prefixed with its line and dotted path)."""
        line = self.doc.line(key_path)
        where = f"line {line}: " if line is not None else ""
        self.items.append(f"{where}{format_key_path(key_path)}: {message}")

    def root(self) -> Node:
        """A reader over the top level, which must be a mapping."""
        return Node(self, (), self.doc.data)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, fix: str = "correct the manifest and rerun") -> None:
        """Raise one :class:`ManifestError` listing every recorded problem (in line order)."""
        if self.items:
            raise ManifestError(self.doc.path, sorted(self.items, key=_line_of), fix=fix)


def _line_of(problem: str) -> int:
    if problem.startswith("line "):
        head = problem[5:].split(":", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


class Node:
    """A typed reader over one mapping of a document; every getter records problems, never raises.

    Getters return the value converted to the requested type, or ``default`` when the key is
    absent (a problem is recorded if ``required``), or the fallback ``default`` when the value is
    of the wrong kind (a problem is recorded). Keys read through a getter are remembered so
    :meth:`reject_unknown` can report misspelt ones.
    """

    def __init__(self, problems: Problems, key_path: KeyPath, value: Any) -> None:
        self.problems = problems
        self.key_path = key_path
        self.ok = isinstance(value, dict)
        if not self.ok:
            problems.add(key_path, f"must be a mapping, got {_type_name(value)}")
        self.value: dict[Any, Any] = value if self.ok else {}
        self.seen: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------
    def path(self, key: str | int) -> KeyPath:
        return (*self.key_path, key)

    def has(self, key: str) -> bool:
        return key in self.value and self.value[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.value.get(key, default)

    def add(self, key: str | int | None, message: str) -> None:
        """Record a problem about ``key`` of this mapping (or the mapping itself with None)."""
        self.problems.add(self.key_path if key is None else self.path(key), message)

    def _get(self, key: str, required: bool, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.value or self.value[key] is None:
            if required:
                self.add(None, f"missing required key {key!r}")
            return _MISSING
        return self.value[key]

    # -- scalars ----------------------------------------------------------------------------
    def get_str(
        self, key: str, default: Any = None, *, required: bool = False, choices: Sequence[str] | None = None
    ) -> Any:
        value = self._get(key, required, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.add(key, f"must be a string, got {_type_name(value)}")
            return default
        value = str(value)
        if choices is not None and value not in choices:
            self.add(key, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def get_bool(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self._get(key, required, default)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.add(key, f"must be true or false, got {_type_name(value)} {value!r}")
            return default
        return value

    def get_int(
        self,
        key: str,
        default: Any = None,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        value = self._get(key, required, default)
        if value is _MISSING:
            return default
        return self._check_int(key, value, default, minimum, maximum)

    def _check_int(self, key: str | int, value: Any, default: Any, minimum: int | None, maximum: int | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(key, f"must be an integer, got {_type_name(value)} {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.add(key, f"must be >= {minimum}, got {value}")
            return default
        if maximum is not None and value > maximum:
            self.add(key, f"must be <= {maximum}, got {value}")
            return default
        return value

    def get_float(
        self,
        key: str,
        default: Any = None,
        *,
        required: bool = False,
        minimum: float | None = None,
        exclusive_minimum: float | None = None,
    ) -> Any:
        value = self._get(key, required, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(key, f"must be a number, got {_type_name(value)} {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.add(key, f"must be >= {minimum}, got {value}")
            return default
        if exclusive_minimum is not None and value <= exclusive_minimum:
            self.add(key, f"must be > {exclusive_minimum}, got {value}")
            return default
        return float(value)

    # -- collections ------------------------------------------------------------------------
    def str_list(self, key: str, default: Any = None, *, required: bool = False, allow_scalar: bool = True) -> Any:
        """A list of strings (a single string is accepted as a one-item list if ``allow_scalar``)."""
        value = self._get(key, required, default)
        if value is _MISSING:
            return default
        if allow_scalar and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.add(key, f"must be a list of strings, got {_type_name(value)}")
            return default
        out: list[str] = []
        bad = False
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                self.problems.add((*self.path(key), i), f"must be a string, got {_type_name(item)}")
                bad = True
            else:
                out.append(str(item))
        return default if bad else out

    def int_list(
        self,
        key: str,
        default: Any = None,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
        allow_scalar: bool = True,
        unique: bool = True,
    ) -> Any:
        """A list of integers (a single integer gives a one-item list if ``allow_scalar``)."""
        value = self._get(key, required, default)
        if value is _MISSING:
            return default
        if allow_scalar and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            self.add(key, f"must be an integer or a non-empty list of integers, got {_type_name(value)}")
            return default
        out: list[int] = []
        bad = False
        sub = Node(self.problems, self.path(key), {i: v for i, v in enumerate(value)})
        for i, item in enumerate(value):
            checked = sub._check_int(i, item, _MISSING, minimum, maximum)
            if checked is _MISSING:
                bad = True
            elif unique and checked in out:
                sub.add(i, f"repeats {checked}")
                bad = True
            else:
                out.append(checked)
        return default if bad else out

    def mapping(self, key: str, *, required: bool = False) -> Node | None:
        """A reader over the nested mapping ``key`` (None when absent or not a mapping)."""
        value = self._get(key, required, None)
        if value is _MISSING:
            return None
        node = Node(self.problems, self.path(key), value)
        return node if node.ok else None

    def items(self, key: str, *, required: bool = False, non_empty: bool = False) -> Iterator[tuple[int, Any]]:
        """``(index, value)`` of the list ``key`` (nothing when absent or not a list)."""
        value = self._get(key, required, None)
        if value is _MISSING:
            return iter(())
        if not isinstance(value, list):
            self.add(key, f"must be a list, got {_type_name(value)}")
            return iter(())
        if non_empty and not value:
            self.add(key, "must not be empty")
        return iter(list(enumerate(value)))

    def mappings(self, key: str, *, required: bool = False, non_empty: bool = False) -> Iterator[Node]:
        """Readers over each mapping of the list ``key`` (non-mapping items are reported and skipped)."""
        for i, value in self.items(key, required=required, non_empty=non_empty):
            node = Node(self.problems, (*self.path(key), i), value)
            if node.ok:
                yield node

    def reject_unknown(self, allowed: Iterable[str] | None = None) -> None:
        """Report every key not in ``allowed`` (default: the keys read so far) and suggest a spelling."""
        import difflib

        known = set(allowed) if allowed is not None else set(self.seen)
        for key in self.value:
            if str(key) not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
                self.add(str(key), f"unknown key{hint}")

    def check(self, key: str, ok: bool, message: str) -> bool:
        """Record ``message`` about ``key`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.add(key, message)
        return ok


def validate(doc: Document, build: Callable[[Problems], T], *, fix: str = "correct the manifest and rerun") -> T:
    """Run ``build`` (which reads ``doc`` through a :class:`Problems`) and raise if it found any.

    Returns:
        whatever ``build`` returned, when no problem was recorded.

    Raises:
        ManifestError: listing every problem ``build`` recorded, in line order.
    """
    problems = Problems(doc)
    result = build(problems)
    problems.raise_if_any(fix)
    return result

"""Manifests: YAML read with line numbers, validated into strict pydantic models, every problem at once.

Every manifest in ``manifests/`` (zoo, serve, ...) is read the same way:

1. :func:`load_yaml` parses the file into plain Python data *and* remembers the line of every key
   path (``("entries", 1, "rank")`` -> 12) and the source text of every scalar (to quote it back).
   Syntax errors and duplicate keys become a :class:`~pissa.core.errors.ManifestError` with their line.
2. :func:`check` validates the data into a :class:`ManifestModel` (strict types: a YAML ``0755`` or
   ``yes`` is never turned into a string; unknown keys refused with a "did you mean" hint) and turns
   pydantic's errors into problems ``line 12: entries[1].rank: must be >= 1, got 0``.
3. A feature may add checks that need the whole document (names unique across entries, paths
   relative to the manifest, defaults merged into entries) on the parts that validated
   (:meth:`Checked.clean_value`, :meth:`Checked.clean_mapping`), then :meth:`Checked.result`
   raises one :class:`ManifestError` listing every problem in line order, or returns the model.

Example::

    class Entry(ManifestModel):
        name: str
        ranks: Seq[Annotated[int, Field(ge=1)]] = (16,)

    class Demo(ManifestModel):
        entries: Annotated[Seq[Entry], Field(min_length=1)]

    demo = check(load_yaml(path), Demo).result()

A new manifest section (e.g. ``tenants:``) is one more :class:`ManifestModel` field. This module
knows nothing about zoos or serving; their models live with their features.
"""

from __future__ import annotations

import datetime
import difflib
import inspect
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from pissa.core.errors import ManifestError

KeyPath = tuple[str | int, ...]
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_MISSING: Any = object()


@dataclass(frozen=True)
class Document:
    """A parsed YAML file: its data, the line (1-based) of every key path and the text of every scalar.

    Attributes:
        path: the file it was read from (as given; used in messages).
        data: the plain Python data (dicts, lists, scalars).
        lines: key path -> line of the key (for mapping members) or of the item (for list items),
            in document order.
        texts: key path -> the scalar as written (``0755`` for the integer 493).
    """

    path: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    texts: dict[KeyPath, str] = field(default_factory=dict)

    def line(self, key_path: KeyPath) -> int | None:
        """Line of ``key_path``, or of its nearest ancestor that has one (None for an empty file)."""
        return self.lines.get(self.nearest(key_path))

    def nearest(self, key_path: KeyPath) -> KeyPath:
        """``key_path`` itself, or its nearest ancestor that has a line."""
        kp = tuple(key_path)
        while kp and kp not in self.lines:
            kp = kp[:-1]
        return kp

    def value(self, key_path: KeyPath) -> Any:
        """The raw value at ``key_path`` (``_MISSING`` when there is none)."""
        value = self.data
        for part in key_path:
            if isinstance(part, int):
                if not isinstance(value, list) or not 0 <= part < len(value):
                    return _MISSING
            elif not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
        return value


def format_key_path(key_path: KeyPath) -> str:
    """``("entries", 1, "rank")`` -> ``entries[1].rank`` (``<top level>`` for the root)."""
    out = ""
    for part in key_path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


# --- YAML ---------------------------------------------------------------------------------------
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
        if node is None:
            return Document(path, None, {(): 1})
        doc = Document(path, None)
        problems: list[str] = []
        data = _build(loader, node, (), doc, problems)
    finally:
        loader.dispose()
    if problems:
        raise ManifestError(path, problems, fix="fix the YAML above")
    return Document(path, data, doc.lines, doc.texts)


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


def _build(loader: Any, node: Any, kp: KeyPath, doc: Document, problems: list[str]) -> Any:
    import yaml

    lines = doc.lines
    lines.setdefault(kp, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<: *anchor)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(f"line {key_node.start_mark.line + 1}: {format_key_path(kp)}: keys must be scalars")
                continue
            key = key_node.value  # as written: a key `on:` or `1:` is a name, not YAML's true or 1
            if key in out:
                problems.append(
                    f"line {key_node.start_mark.line + 1}: {format_key_path((*kp, key))}: duplicate key "
                    f"(first on line {lines[(*kp, key)]})"
                )
                continue
            child = (*kp, key)
            lines[child] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, child, doc, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*kp, i), doc, problems) for i, item in enumerate(node.value)]
    doc.texts[kp] = node.value
    return loader.construct_object(node, deep=True)


# --- models -------------------------------------------------------------------------------------
class ManifestModel(BaseModel):
    """Base of every manifest section: strict types, unknown keys refused, immutable.

    A key with no value (``defaults:`` with every line under it commented out) is the same as no key.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# A YAML list held as a tuple (strict validation otherwise refuses the list YAML gives).
Seq = Annotated[tuple[T, ...], BeforeValidator(_list_to_tuple)]

SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)


def parse_size(value: int | str) -> int | None:
    """``64M`` -> 67108864, ``1G`` -> 1073741824, 4096 -> 4096 (binary units); None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    m = SIZE_RE.match(str(value).strip())
    if not m:
        return None
    unit = (m.group(2) or "B").upper()[0]
    factor = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    n = int(m.group(1)) * factor
    return n if n > 0 else None


def _size(value: Any) -> Any:
    """``kv_cache_memory_bytes: 64M`` -> 67108864 (integers pass through to the type check)."""
    if isinstance(value, str):
        size = parse_size(value)
        if size is None:
            raise ValueError(f"must be a positive size like 64M or 1G, got {value!r}")
        return size
    return value


# A byte count written as an integer or with a binary unit suffix (``64M``, ``1G``).
Size = Annotated[int, BeforeValidator(_size), Field(gt=0)]


NAME_RULE = "use only letters, digits, '.', '_' and '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a served model or an output folder (None: it can)."""
    return None if _NAME.fullmatch(name) else f"{name!r}: {NAME_RULE}"


def host_problem(host: str) -> str | None:
    """None if ``host`` can be a listen address (a name or IP: not empty, no spaces). An empty host would
    make a server listen on every interface."""
    if not host.strip():
        return "the host is empty (a server would listen on every interface); give e.g. 127.0.0.1 or 0.0.0.0"
    if any(c.isspace() for c in host):
        return f"host {host!r} holds spaces; give a name or an IP address"
    return None


def refusing(problem: Callable[[str], str | None]) -> Callable[[str], str]:
    """The pydantic after-validator of a ``*_problem`` function: raises its message, else passes the value."""

    def check(value: str) -> str:
        found = problem(value)
        if found:
            raise ValueError(found)
        return value

    return check


#: A listen address: not empty (that would be every interface), no spaces.
Host = Annotated[str, AfterValidator(refusing(host_problem))]
#: Pydantic after-validator form of :func:`name_problem`.
check_name = refusing(name_problem)


def one_of(*choices: str) -> Callable[[str], str]:
    """An after-validator that accepts only ``choices`` (``Annotated[str, AfterValidator(one_of(...))]``)."""

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


# --- problems -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One problem of a document: where (a key path) and what."""

    key_path: KeyPath
    message: str


class Checked(Generic[M]):
    """The outcome of :func:`check`: the model (None when it did not validate) and every problem."""

    def __init__(self, doc: Document, value: M | None, problems: list[Problem]) -> None:
        self.doc = doc
        self.value = value
        self.problems = problems

    def add(self, key_path: KeyPath, message: str) -> None:
        """Record a problem found by a feature's own checks."""
        self.problems.append(Problem(tuple(key_path), message))

    def clean(self, key_path: KeyPath) -> bool:
        """No problem was found at ``key_path`` or under it."""
        n = len(key_path)
        return not any(p.key_path[:n] == tuple(key_path) for p in self.problems)

    def clean_value(self, key_path: KeyPath) -> Any:
        """The value at ``key_path`` if it is present and validated (strict: as written), else None."""
        value = self.doc.value(key_path)
        return None if value is _MISSING or not self.clean(key_path) else value

    def clean_mapping(self, key_path: KeyPath) -> dict[str, Any]:
        """The keys of the mapping at ``key_path`` that have a value and validated ({} if not a mapping).

        Validating them again into the section's model gives the section with its defaults in place
        of the bad values, so a feature's checks can run even where some keys are wrong.
        """
        value = self.doc.value(key_path)
        if not isinstance(value, dict):
            return {}
        return {k: v for k, v in value.items() if v is not None and self.clean((*key_path, k))}

    def messages(self) -> list[str]:
        """Every problem as ``line N: key.path: message``, in document order."""
        order = {kp: i for i, kp in enumerate(self.doc.lines)}

        def position(p: Problem) -> tuple[int, int]:
            nearest = self.doc.nearest(p.key_path)
            return self.doc.lines.get(nearest, 0), order.get(nearest, 0)

        out = []
        for p in sorted(self.problems, key=position):
            line = self.doc.line(p.key_path)
            where = f"line {line}: " if line is not None else ""
            out.append(f"{where}{format_key_path(p.key_path)}: {p.message}")
        return out

    def result(self, fix: str = "correct the manifest and rerun") -> M:
        """The validated model.

        Raises:
            ManifestError: listing every problem, in line order.
        """
        if self.problems or self.value is None:
            raise ManifestError(self.doc.path, self.messages(), fix=fix)
        return self.value


def check(doc: Document, model: type[M]) -> Checked[M]:
    """Validate ``doc`` into ``model``, collecting every problem (none raised)."""
    try:
        return Checked(doc, model.model_validate(doc.data), [])
    except ValidationError as exc:
        return Checked(doc, None, error_problems(exc, model, doc))


def error_problems(exc: ValidationError, model: type[BaseModel], doc: Document | None = None) -> list[Problem]:
    """Pydantic's errors as problems with manifest wording (``doc`` gives the scalars as written)."""
    return [_problem(err, model, doc) for err in exc.errors()]


# pydantic error type -> what the value must be / which bound it broke.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "model_type": "a mapping",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _problem(err: Any, model: type[BaseModel], doc: Document | None) -> Problem:
    loc: KeyPath = tuple(err["loc"])
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    got = _describe(value)
    if kind == "missing":
        return Problem(loc[:-1], f"missing required key {loc[-1]!r}")
    if kind == "extra_forbidden":
        known = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})" if known else ""
        return Problem(loc, f"unknown key{hint}")
    if kind == "string_type":
        text = doc.texts.get(loc) if doc is not None else None
        quote = f' — quote it: "{text}"' if text is not None and value is not None else ""
        return Problem(loc, f"must be a string, got {got}{quote}")
    if kind in _EXPECTED:
        return Problem(loc, f"must be {_EXPECTED[kind]}, got {got}")
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx[key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound  # 0.0 -> 0
        return Problem(loc, f"must be {op} {bound}, got {value}")
    if kind == "too_short" and ctx.get("min_length") == 1:
        return Problem(loc, "must not be empty")
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return Problem(loc, str(ctx["error"]))
    return Problem(loc, f"{err['msg']}, got {got}")


def _describe(value: Any) -> str:
    """A YAML value in words: ``a string 'x'``, ``the number 493``, ``the boolean true``, ``a list``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"a string {value!r}"
    if isinstance(value, datetime.date):
        return f"the date {value.isoformat()}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unwrap(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = get_origin(annotation)
        args = get_args(annotation)
        if origin is Annotated:
            annotation = args[0]
        elif origin in (Union, types.UnionType) and len([a for a in args if a is not type(None)]) == 1:
            annotation = next(a for a in args if a is not type(None))
        else:
            return annotation


def _keys_at(model: type[BaseModel], loc: KeyPath) -> list[str]:
    """The keys the model allows in the mapping at ``loc`` (empty when it cannot tell)."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(part, str) and inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(part)
            if info is None:
                return []
            annotation = info.annotation
        elif isinstance(part, int) and get_origin(annotation) in (tuple, list):
            annotation = get_args(annotation)[0]
        else:
            return []
    annotation = _unwrap(annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return sorted(annotation.model_fields)
    return []

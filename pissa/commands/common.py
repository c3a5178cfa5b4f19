"""Helpers shared by the CLI commands (no library logic): tables, sizes, and the defaults of options."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from converter.zoo_report import human_bytes  # one implementation, shared with the zoo report

__all__ = ["default_of", "human_bytes", "table"]


def default_of(owner: Any, name: str) -> Any:
    """The default of ``name`` where the library defines it, so a click option never restates it.

    Args:
        owner: an options dataclass (``ConvertOptions``), a pydantic model class, or the library
            function a command calls (``run_zoo``): its field or keyword parameter ``name``.
        name: the field or parameter.

    Returns:
        its default (a ``default_factory`` is called).

    Raises:
        LookupError: ``owner`` has no ``name``, or ``name`` has no default (a programming error,
            raised when the command's module is imported, so a renamed field cannot go unnoticed).
    """
    if dataclasses.is_dataclass(owner) and isinstance(owner, type):
        for f in dataclasses.fields(owner):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                break
        raise LookupError(f"{owner.__name__}.{name}: no such field with a default")
    model_fields = getattr(owner, "model_fields", None)
    if isinstance(owner, type) and isinstance(model_fields, dict):  # a pydantic model
        info = model_fields.get(name)
        if info is None or info.is_required():
            raise LookupError(f"{owner.__name__}.{name}: no such field with a default")
        return info.get_default(call_default_factory=True)
    parameter = inspect.signature(owner).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise LookupError(f"{getattr(owner, '__qualname__', owner)}({name}=...): no such parameter with a default")
    return parameter.default


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)

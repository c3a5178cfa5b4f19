"""Formatting helpers shared by the CLI commands (no library logic)."""

from __future__ import annotations

from converter.zoo_report import human_bytes  # one implementation, shared with the zoo report

__all__ = ["human_bytes", "table"]


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)

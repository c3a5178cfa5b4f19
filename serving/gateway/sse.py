"""Server-sent events, as vLLM streams them (``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``). Pure."""

from __future__ import annotations

import json
from typing import Any


class EventSplitter:
    """Cuts a byte stream into whole events (each with its blank-line terminator), in order."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        while True:
            cut = _boundary(self._buffer)
            if cut is None:
                return events
            events.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]

    def rest(self) -> bytes:
        """Bytes after the last whole event (normally none)."""
        rest, self._buffer = self._buffer, b""
        return rest


def _boundary(buffer: bytes) -> int | None:
    ends = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else None


def event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object in an event's ``data:`` lines (None for ``[DONE]``, comments or non-JSON)."""
    lines = [line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        data = json.loads(b"\n".join(lines))
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read
        return None
    return data if isinstance(data, dict) else None


def usage_of(data: object) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of a response or chunk that carries usage (any JSON value in)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def is_usage_only(data: dict[str, Any] | None) -> bool:
    """The final usage chunk ``include_usage`` adds (no choices, only usage)."""
    return bool(data) and data.get("choices") == [] and usage_of(data) is not None  # type: ignore[union-attr]

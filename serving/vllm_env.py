"""Is vLLM usable here, and a free loopback port: what the launcher and its callers check first."""

from __future__ import annotations

import importlib.util
import socket

from pissa.core.errors import MissingDependencyError


def vllm_available() -> bool:
    """True when vLLM and the openai client can be imported (without importing them)."""
    return importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("openai") is not None


def require_vllm(purpose: str = "to serve adapters") -> None:
    """Raise :class:`MissingDependencyError` (with the install line) unless vLLM is usable."""
    if importlib.util.find_spec("vllm") is None:
        raise MissingDependencyError("vllm", extra="serve-cpu", purpose=f"{purpose}; GPU machines: .[serve]")
    if importlib.util.find_spec("openai") is None:
        raise MissingDependencyError("openai", extra="serve-cpu", purpose=purpose)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

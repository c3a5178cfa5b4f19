"""Serve a base and adapters just long enough to ask them something (for ``pissa demo`` and scripts).

:func:`serve_and_ask` validates, starts vLLM (through :class:`serving.launcher.VllmServer`), sends
every prompt to the base and to each adapter through the OpenAI client (chat completions with the
model's chat template, greedy), stops the server and returns the answers. When vLLM or the
``openai`` client is missing it raises :class:`~pissa.core.errors.MissingDependencyError`, whose message
says how to enable it, so a caller can fall back to transformers + PEFT.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serving.launcher import VllmServer, plan_serving
from serving.manifest import VllmSettings, manifest_from_flags
from serving.vllm_env import free_port, require_vllm, vllm_available

__all__ = ["SessionResult", "serve_and_ask", "vllm_available"]


@dataclass(frozen=True)
class SessionResult:
    """Answers by model name then prompt, plus timings."""

    url: str
    answers: dict[str, dict[str, str]] = field(default_factory=dict)
    startup_s: float = 0.0
    total_s: float = 0.0
    log_path: str | None = None


def serve_and_ask(
    base: str | Path,
    adapters: Mapping[str, str | Path],
    prompts: Sequence[str],
    *,
    max_tokens: int = 48,
    dtype: str = "auto",
    kv_cache_bytes: int = 256 * 2**20,
    health_timeout: float = 300.0,
    log_path: str | Path | None = None,
    max_model_len: int | None = None,
) -> SessionResult:
    """Start vLLM on ``base`` with ``adapters``, ask each prompt to every model, stop.

    Args:
        base: base model folder (or hub id).
        adapters: name -> adapter folder.
        prompts: user messages (sent through the chat template).
        max_tokens: tokens per answer (greedy).
        dtype: vLLM ``--dtype``.
        kv_cache_bytes: KV cache size (set explicitly: the CPU default is ~10 GiB).
        health_timeout: start-up limit in seconds.
        log_path: vLLM's log (default: a temp file).
        max_model_len: context length (default: the model's).

    Raises:
        MissingDependencyError: vLLM or openai not installed (message says how to install).
        AdapterValidationError: an adapter does not fit the base (nothing started).
        ServingError: vLLM failed to start (tail of its log).
    """
    require_vllm()
    from openai import OpenAI

    settings = VllmSettings(port=free_port(), dtype=dtype, max_loras=max(1, len(adapters)),
                            kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len,
                            runtime_lora_updating=False, health_timeout=health_timeout)
    manifest = manifest_from_flags(str(base), [f"{n}={p}" for n, p in adapters.items()], served_name="base",
                                   settings=settings, extra_args=("--enforce-eager",))
    plan = plan_serving(manifest)
    t0 = time.perf_counter()
    answers: dict[str, dict[str, str]] = {}
    server = VllmServer(plan, Path(log_path) if log_path else None, health_timeout)
    with server:
        startup = time.perf_counter() - t0
        client = OpenAI(base_url=plan.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for model in plan.served_names:
            answers[model] = {}
            for prompt in prompts:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0)
                answers[model][prompt] = r.choices[0].message.content or ""
    return SessionResult(plan.url, answers, startup, time.perf_counter() - t0,
                         str(server.log_path) if server.log_path else None)

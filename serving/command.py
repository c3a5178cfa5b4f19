"""Build the exact vLLM OpenAI-server command line (and environment) for a serving manifest.

Pure: a manifest and the validated ``max_lora_rank`` in, a :class:`LaunchPlan` out. The API key
never appears in the command: vLLM reads it from ``VLLM_API_KEY``, which the plan copies from the
manifest's ``api_key_env`` variable at launch.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from pissa.core.errors import InvalidOptionsError
from serving.kv_cache import KvCacheChoice
from serving.manifest import ServeManifest

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class LaunchPlan:
    """What to run: ``argv``, environment additions, and where clients connect."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    url: str
    served_names: tuple[str, ...]
    max_lora_rank: int
    host: str
    port: int
    notes: tuple[str, ...] = ()  # start-up lines about choices made for the user (the KV cache size)

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (environment first; secrets masked)."""
        env = " ".join(f"{k}={shlex.quote(v if k != 'VLLM_API_KEY' else '***')}" for k, v in self.env.items())
        cmd = shlex.join(self.argv)
        return f"{env} {cmd}" if env else cmd


def client_host(host: str) -> str:
    """Where a local client connects for a bind address (``0.0.0.0`` -> ``127.0.0.1``)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def client_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` where a local client reaches a server bound to ``host`` (IPv6 in brackets)."""
    h = client_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def build_command(
    manifest: ServeManifest,
    max_lora_rank: int,
    *,
    python: str | None = None,
    environ: Mapping[str, str] | None = None,
    kv_cache: KvCacheChoice | None = None,
) -> LaunchPlan:
    """The vLLM server command for ``manifest``.

    Args:
        manifest: validated manifest.
        max_lora_rank: from :func:`serving.validate.select_max_lora_rank`.
        python: interpreter (default: this one).
        environ: where ``api_key_env`` is looked up (default: ``os.environ``).
        kv_cache: the KV cache decision (:func:`serving.kv_cache.decide_kv_cache`); default: the manifest's
            ``kv_cache_memory_bytes`` as is.

    Raises:
        InvalidOptionsError: ``api_key_env`` names a variable that is not set.
    """
    import os

    environ = os.environ if environ is None else environ
    s = manifest.vllm
    argv: list[str] = [python or sys.executable, "-m", SERVER_MODULE,
                       "--model", manifest.base.ref.value,
                       "--served-model-name", manifest.base.served_name,
                       "--host", s.host, "--port", str(s.port), "--dtype", s.dtype]
    enable_lora = bool(manifest.adapters) or s.runtime_lora_updating
    if enable_lora:
        max_loras = s.max_loras or max(1, len(manifest.adapters))
        argv += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank)]
        if s.max_cpu_loras is not None:
            argv += ["--max-cpu-loras", str(s.max_cpu_loras)]
        if manifest.adapters:
            argv += ["--lora-modules", *(f"{a.name}={a.ref.value}" for a in manifest.adapters)]
    kv_bytes = kv_cache.kv_bytes if kv_cache is not None else s.kv_cache_memory_bytes
    if s.max_model_len is not None:
        argv += ["--max-model-len", str(s.max_model_len)]
    elif kv_cache is not None and kv_cache.fit_context:
        argv += ["--max-model-len", "auto"]
    if kv_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_bytes)]
    if s.tensor_parallel_size != 1:
        argv += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
    argv += list(manifest.extra_args)

    env: dict[str, str] = {}
    if enable_lora and s.runtime_lora_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if s.api_key_env:
        key = environ.get(s.api_key_env)
        if not key:
            raise InvalidOptionsError(
                "api key missing", [f"vllm.api_key_env names {s.api_key_env!r}, which is not set or empty"],
                fix=f"export {s.api_key_env}=<key> before starting, or drop api_key_env",
            )
        env["VLLM_API_KEY"] = key
    url = client_url(s.host, s.port)
    notes = kv_cache.notes if kv_cache is not None else ()
    return LaunchPlan(tuple(argv), env, url, manifest.served_names, max_lora_rank, s.host, s.port, notes)

"""The serving manifest (``manifests/serve*.yaml``) as frozen dataclasses, validated all at once.

Layout (every key but ``base.path`` optional)::

    base:
      path: ../bundles/smollm2        # folder (relative to this file) or hub id
      served_name: smollm2            # model name clients use for the base (default: the path)
      aliases: [HuggingFaceTB/SmolLM2-135M-Instruct]   # other names this exact base is known by
    adapters:
      - name: tenant-a                # model name clients use for this adapter
        path: ../exports/tenant-a     # folder (relative to this file) or hub id
    vllm:
      host: 127.0.0.1
      port: 8000
      dtype: auto                     # auto | float32 | float16 | bfloat16
      max_loras: 2                    # adapters in one batch (LoRA slots); default: number of adapters
      max_cpu_loras: 4                # adapters cached in memory; default: vLLM's (= max_loras)
      max_lora_rank: 16               # reserve room for larger runtime adapters; default: from adapters
      max_model_len: 2048
      kv_cache_memory_bytes: 64M      # int bytes or K/M/G suffix; unset: chosen on CPU (serving/kv_cache.py)
      tensor_parallel_size: 1
      api_key_env: PISSA_API_KEY      # name of the environment variable holding the API key
      runtime_lora_updating: true     # allow /v1/load_lora_adapter (pissa adapters add/remove)
      health_timeout: 300             # seconds to wait for /health at start-up
    extra_args: [--enforce-eager]     # passed to vLLM verbatim (not the flags set above)

Path rule: a value that names an existing file or folder (relative to the manifest's folder, or
absolute) is a local path; otherwise a value of the form ``owner/name`` is a hub id; anything else
is a missing local path and is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pissa.core.errors import InvalidOptionsError

DTYPES = ("auto", "float32", "float16", "bfloat16")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
# Flags the launcher sets from the manifest: giving them again in extra_args is a conflict.
MANAGED_FLAGS = (
    "--model", "--host", "--port", "--dtype", "--served-model-name", "--enable-lora", "--lora-modules",
    "--max-loras", "--max-cpu-loras", "--max-lora-rank", "--max-model-len", "--kv-cache-memory-bytes",
    "--tensor-parallel-size", "--api-key",
)


@dataclass(frozen=True)
class ModelRef:
    """A model or adapter location: a local path (absolute) or a hub id."""

    value: str
    is_local: bool

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BaseSpec:
    ref: ModelRef
    served_name: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    ref: ModelRef


@dataclass(frozen=True)
class VllmSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = 1
    api_key_env: str | None = None
    runtime_lora_updating: bool = True
    health_timeout: float = 300.0


@dataclass(frozen=True)
class ServeManifest:
    base: BaseSpec
    adapters: tuple[AdapterSpec, ...] = ()
    vllm: VllmSettings = field(default_factory=VllmSettings)
    extra_args: tuple[str, ...] = ()
    path: str | None = None

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.base.served_name, *(a.name for a in self.adapters))


# --- pure helpers -------------------------------------------------------------------------------
def resolve_ref(value: str, root: Path) -> tuple[ModelRef | None, str | None]:
    """Apply the path rule to ``value`` (relative to ``root``): ``(ref, None)`` or ``(None, problem)``."""
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = root / candidate
    if candidate.exists():
        return ModelRef(str(candidate.resolve()), True), None
    if HUB_ID_RE.match(value) and not value.startswith((".", "/", "~")):
        return ModelRef(value, False), None
    return None, f"{value!r} is neither an existing path (looked at {candidate}) nor a hub id (owner/name)"


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


def name_problems(base_name: str, adapter_names: list[str]) -> list[str]:
    """Adapter names must be distinct, and no adapter may be called like the base."""
    problems = []
    seen: set[str] = set()
    for n in adapter_names:
        if n in seen:
            problems.append(f"adapter name {n!r} is used twice")
        seen.add(n)
        if n == base_name:
            problems.append(f"adapter name {n!r} is the base's served name")
    return problems


def extra_arg_problems(extra_args: list[str]) -> list[str]:
    """Extra vLLM arguments may not repeat a flag the launcher sets from the manifest."""
    out = []
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            out.append(f"{flag} is set by the manifest's own keys; use those instead")
    return out


# --- readers ------------------------------------------------------------------------------------
def load_serve_manifest(path: str | Path) -> ServeManifest:
    """Read and validate a serving manifest.

    Raises:
        ManifestError: every problem of the file at once, each with its line.
    """
    from pissa.core.manifests import Problems, load_yaml

    doc = load_yaml(path)
    root_dir = Path(path).resolve().parent
    problems = Problems(doc)
    root = problems.root()

    base_node = root.mapping("base", required=True)
    base: BaseSpec | None = None
    if base_node is not None:
        raw = base_node.get_str("path", required=True)
        served = base_node.get_str("served_name")
        aliases = base_node.str_list("aliases", default=[])
        base_node.reject_unknown({"path", "served_name", "aliases"})
        if raw is not None:
            ref, problem = resolve_ref(raw, root_dir)
            if problem:
                base_node.add("path", problem)
            elif ref is not None:
                base = BaseSpec(ref, served or raw, tuple(aliases))

    adapters: list[AdapterSpec] = []
    seen_names: set[str] = set()
    for node in root.mappings("adapters"):
        name = node.get_str("name", required=True)
        raw = node.get_str("path", required=True)
        node.reject_unknown({"name", "path"})
        if name is not None and not NAME_RE.match(name):
            node.add("name", f"must match {NAME_RE.pattern}, got {name!r}")
            name = None
        if name is not None:
            if name in seen_names:
                node.add("name", f"adapter name {name!r} is used twice")
                name = None
            else:
                seen_names.add(name)
        if raw is None:
            continue
        ref, problem = resolve_ref(raw, root_dir)
        if problem:
            node.add("path", problem)
        elif name is not None and ref is not None:
            adapters.append(AdapterSpec(name, ref))

    settings = VllmSettings()
    v = root.mapping("vllm")
    if v is not None:
        kv_raw = v.raw("kv_cache_memory_bytes")
        kv = None
        if kv_raw is not None:
            kv = parse_size(kv_raw)
            if kv is None:
                v.add("kv_cache_memory_bytes", f"must be a positive size like 64M or 1G, got {kv_raw!r}")
        settings = VllmSettings(
            host=v.get_str("host", "127.0.0.1"),
            port=v.get_int("port", 8000, minimum=1, maximum=65535),
            dtype=v.get_str("dtype", "auto", choices=DTYPES),
            max_loras=v.get_int("max_loras", None, minimum=1),
            max_cpu_loras=v.get_int("max_cpu_loras", None, minimum=1),
            max_lora_rank=v.get_int("max_lora_rank", None, minimum=1),
            max_model_len=v.get_int("max_model_len", None, minimum=1),
            kv_cache_memory_bytes=kv,
            tensor_parallel_size=v.get_int("tensor_parallel_size", 1, minimum=1),
            api_key_env=v.get_str("api_key_env"),
            runtime_lora_updating=v.get_bool("runtime_lora_updating", True),
            health_timeout=v.get_float("health_timeout", 300.0, exclusive_minimum=0),
        )
        v.reject_unknown()
    extra = root.str_list("extra_args", default=[], allow_scalar=False)
    root.reject_unknown({"base", "adapters", "vllm", "extra_args"})

    if base is not None and base.served_name in seen_names:
        root.add("adapters", f"adapter name {base.served_name!r} is the base's served name")
    for p in settings_problems(settings):
        root.add("vllm", p)
    for p in extra_arg_problems(extra):
        root.add("extra_args", p)
    problems.raise_if_any()
    assert base is not None
    return ServeManifest(base, tuple(adapters), settings, tuple(extra), str(path))


def settings_problems(s: VllmSettings) -> list[str]:
    """Cross-field checks of the vLLM settings."""
    out = []
    if s.max_loras is not None and s.max_cpu_loras is not None and s.max_cpu_loras < s.max_loras:
        out.append(f"max_cpu_loras ({s.max_cpu_loras}) must be >= max_loras ({s.max_loras})")
    return out


def manifest_from_flags(
    base: str,
    adapters: list[str],
    *,
    served_name: str | None = None,
    settings: VllmSettings | None = None,
    extra_args: tuple[str, ...] = (),
    root: Path | None = None,
) -> ServeManifest:
    """Build a manifest from ``--base PATH`` and repeated ``--adapter NAME=PATH`` flags.

    Raises:
        InvalidOptionsError: every problem with the flags at once.
    """
    root = root or Path.cwd()
    problems: list[str] = []
    base_ref, problem = resolve_ref(base, root)
    if problem:
        problems.append(f"--base: {problem}")
    specs: list[AdapterSpec] = []
    for item in adapters:
        name, sep, raw = item.partition("=")
        if not sep or not name or not raw:
            problems.append(f"--adapter {item!r}: expected NAME=PATH")
            continue
        if not NAME_RE.match(name):
            problems.append(f"--adapter {item!r}: name must match {NAME_RE.pattern}")
            continue
        ref, problem = resolve_ref(raw, root)
        if problem:
            problems.append(f"--adapter {name}: {problem}")
        elif ref is not None:
            specs.append(AdapterSpec(name, ref))
    settings = settings or VllmSettings()
    served = served_name or base
    problems += name_problems(served, [a.name for a in specs])
    problems += settings_problems(settings)
    problems += [f"extra args: {p}" for p in extra_arg_problems(list(extra_args))]
    if problems:
        raise InvalidOptionsError("invalid serve options", problems, fix="fix the flags and rerun")
    assert base_ref is not None
    return ServeManifest(BaseSpec(base_ref, served), tuple(specs), settings, tuple(extra_args))


def resolve_manifest(
    path: str | Path | None,
    *,
    base: str | None = None,
    adapters: list[str] | None = None,
    served_name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    dtype: str | None = None,
    max_loras: int | None = None,
    kv_cache: str | None = None,
) -> ServeManifest:
    """The manifest ``pissa serve`` runs: a file, or ``--base``/``--adapter`` flags, plus overrides.

    With a file, ``--adapter`` flags add adapters and the other flags override its ``vllm`` keys.

    Raises:
        ManifestError: the file does not validate.
        InvalidOptionsError: the flags do not (every problem at once).
    """
    from dataclasses import replace

    problems: list[str] = []
    if path is None and base is None:
        problems.append("give a MANIFEST file or --base PATH (with --adapter NAME=PATH ...)")
    if path is not None and (base is not None or served_name is not None):
        problems.append("--base/--served-name cannot be combined with a MANIFEST (edit its base: section)")
    kv = None
    if kv_cache is not None:
        kv = parse_size(kv_cache)
        if kv is None:
            problems.append(f"--kv-cache must be a size like 64M or 1G, got {kv_cache!r}")
    for flag, value in (("--port", port), ("--max-loras", max_loras)):
        if value is not None and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if problems:
        raise InvalidOptionsError("invalid serve options", problems, fix="see `pissa serve --help`")
    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port), ("dtype", dtype), ("max_loras", max_loras),
                                   ("kv_cache_memory_bytes", kv)) if v is not None}
    if path is None:
        assert base is not None
        return manifest_from_flags(base, list(adapters or []), served_name=served_name,
                                   settings=VllmSettings(**overrides))
    m = load_serve_manifest(path)
    settings = replace(m.vllm, **overrides)
    extra = manifest_from_flags(m.base.ref.value, list(adapters or []), served_name=m.base.served_name,
                                settings=settings, extra_args=m.extra_args) if adapters else None
    all_adapters = m.adapters + (extra.adapters if extra else ())
    names = [a.name for a in all_adapters]
    dup = name_problems(m.base.served_name, names) + settings_problems(settings)
    if dup:
        raise InvalidOptionsError("invalid serve options", dup, fix="rename the --adapter")
    return replace(m, adapters=all_adapters, vllm=settings)

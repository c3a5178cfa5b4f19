"""The serving manifest (``manifests/serve*.yaml``): validated all at once, then resolved into frozen objects.

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
      replicas: 1                     # vLLM servers on this machine, behind vllm-router (serving/replicas.py)
    extra_args: [--enforce-eager]     # passed to vLLM verbatim (not the flags set above)
    upstreams:                        # vLLM servers already running elsewhere, routed with the replicas
      - {url: "http://10.0.0.2:8000", api_key_env: PISSA_UPSTREAM_KEY}
    gateway: {host: 0.0.0.0, port: 8000}   # with tenants: the public listener (serving/gateway/config.py)
    tenants:                          # optional: per-tenant keys, allow-lists, limits, usage
      - name: acme
        models: [tenant-a]
        limits: {requests_per_minute: 120}

The file is validated into :class:`ServeFile` (pydantic, strict types, unknown keys refused; a later
section such as ``tenants:`` is one more model field), then its paths are resolved into a
:class:`ServeManifest`.

Path rule: a value that names an existing file or folder (relative to the manifest's folder, or
absolute) is a local path; otherwise a valid Hub repo id ``owner/name`` (huggingface_hub's rule) is
a hub id; anything else is a missing local path and is reported.
"""

from __future__ import annotations

import difflib
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, field_validator

from pissa.core.errors import InvalidOptionsError
from pissa.core.hub import repo_id_problem
from pissa.core.manifests import (
    Checked,
    Host,
    ManifestModel,
    Seq,
    Size,
    check,
    check_name,
    error_problems,
    format_key_path,
    host_problem,
    load_yaml,
    name_problem,
    one_of,
    parse_size,
)
from serving.gateway.config import GatewayConfig, GatewaySection, TenantSection, gateway_path, resolve_gateway
from serving.validate import ALLOWED_MAX_LORA_RANKS

DTYPES = ("auto", "float32", "float16", "bfloat16")
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


def _not_managed(arg: str) -> str:
    problem = _managed_flag_problem(arg)
    if problem:
        raise ValueError(problem)
    return arg


Count = Annotated[int, Field(ge=1)]
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: str) -> str:
    if not ENV_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _; not first a digit)")
    return value


def url_problem(value: str) -> str | None:
    """None if ``value`` is an ``http(s)://host:port`` server address (no path, query or credentials)."""
    try:
        u = urllib.parse.urlsplit(value)
        port = u.port
    except ValueError as exc:
        return f"{value!r} is not a URL ({exc})"
    if u.scheme not in ("http", "https") or not u.hostname:
        return f"{value!r} is not an http(s)://host:port address"
    if port is None:
        return f"{value!r} has no port (write e.g. http://10.0.0.2:8000)"
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        return f"{value!r} must be just scheme://host:port (no path, query or credentials)"
    return None


def _url(value: str) -> str:
    problem = url_problem(value)
    if problem:
        raise ValueError(problem)
    return value.rstrip("/")


class VllmSettings(ManifestModel):
    """vLLM's settings: the manifest's ``vllm:`` section (``pissa serve`` flags override some)."""

    host: Host = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    dtype: Annotated[str, AfterValidator(one_of(*DTYPES))] = "auto"
    max_loras: Count | None = None
    max_cpu_loras: Count | None = None
    max_lora_rank: Annotated[int, Field(ge=1, le=ALLOWED_MAX_LORA_RANKS[-1])] | None = None  # vLLM's largest
    max_model_len: Count | None = None
    kv_cache_memory_bytes: Size | None = None
    tensor_parallel_size: Count = 1
    api_key_env: str | None = None
    runtime_lora_updating: bool = True
    health_timeout: Annotated[float, Field(gt=0)] = 300.0
    replicas: Count = 1

    @field_validator("max_cpu_loras")
    @classmethod
    def _room_for_the_slots(cls, cpu_loras: int | None, info: ValidationInfo) -> int | None:
        slots = info.data.get("max_loras")
        if cpu_loras is not None and slots is not None and cpu_loras < slots:
            raise ValueError(f"must be >= max_loras ({slots}), got {cpu_loras}")
        return cpu_loras


class BaseSection(ManifestModel):
    path: str
    served_name: str | None = None
    aliases: Seq[str] = ()


class AdapterSection(ManifestModel):
    name: Annotated[str, AfterValidator(check_name)]
    path: str


class UpstreamSection(ManifestModel):
    """A vLLM server already running elsewhere, routed together with the local replicas."""

    url: Annotated[str, AfterValidator(_url)]
    api_key_env: Annotated[str, AfterValidator(_env_name)] | None = None


class ServeFile(ManifestModel):
    """A serving manifest as written (paths not yet resolved)."""

    base: BaseSection
    adapters: Seq[AdapterSection] = ()
    vllm: VllmSettings = VllmSettings()
    extra_args: Seq[Annotated[str, AfterValidator(_not_managed)]] = ()
    gateway: GatewaySection | None = None
    tenants: Seq[TenantSection] = ()
    upstreams: Seq[UpstreamSection] = ()


@dataclass(frozen=True)
class Upstream:
    url: str
    api_key_env: str | None = None


@dataclass(frozen=True)
class ServeManifest:
    base: BaseSpec
    adapters: tuple[AdapterSpec, ...] = ()
    vllm: VllmSettings = field(default_factory=VllmSettings)
    extra_args: tuple[str, ...] = ()
    path: str | None = None
    gateway: GatewayConfig | None = None  # set when the manifest has tenants
    upstreams: tuple[Upstream, ...] = ()

    @property
    def routed(self) -> bool:
        """More than one vLLM server: local replicas and/or upstreams behind vllm-router."""
        return self.vllm.replicas > 1 or bool(self.upstreams)

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
    if repo_id_problem(value) is None:
        return ModelRef(value, False), None
    return None, f"{value!r} is neither an existing path (looked at {candidate}) nor a hub id (owner/name)"


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


def _managed_flag_problem(arg: str) -> str | None:
    flag = arg.split("=", 1)[0]
    return f"{flag} is set by the manifest's own keys; use those instead" if flag in MANAGED_FLAGS else None


def extra_arg_problems(extra_args: list[str]) -> list[str]:
    """Extra vLLM arguments may not repeat a flag the launcher sets from the manifest."""
    return [p for p in map(_managed_flag_problem, extra_args) if p]


# --- readers ------------------------------------------------------------------------------------
def _resolve(checked: Checked[ServeFile], root: Path) -> tuple[BaseSpec | None, tuple[AdapterSpec, ...]]:
    """Resolve the paths that validated against ``root`` and check the served names across sections."""
    base: BaseSpec | None = None
    base_path = checked.clean_value(("base", "path"))
    served = checked.clean_value(("base", "served_name")) or base_path
    if base_path is not None:
        ref, problem = resolve_ref(base_path, root)
        if ref is None:
            checked.add(("base", "path"), str(problem))
        else:
            base = BaseSpec(ref, served, tuple(checked.clean_value(("base", "aliases")) or ()))
    adapters: list[AdapterSpec] = []
    seen: dict[str, int] = {}
    items = checked.doc.value(("adapters",))
    for i in range(len(items) if isinstance(items, list) else 0):
        at = ("adapters", i)
        name, path = checked.clean_value((*at, "name")), checked.clean_value((*at, "path"))
        if name is not None and name in seen:
            checked.add((*at, "name"), f"adapter name {name!r} is used twice (first on line {seen[name]})")
        elif name is not None and name == served:
            checked.add((*at, "name"), f"adapter name {name!r} is the base's served name")
        elif name is not None:
            seen[name] = checked.doc.line(at) or 0
        ref, problem = resolve_ref(path, root) if path is not None else (None, None)
        if problem:
            checked.add((*at, "path"), problem)
        elif name is not None and ref is not None:
            adapters.append(AdapterSpec(name, ref))
    return base, tuple(adapters)


def _check_tenants(checked: Checked[ServeFile], served: set[str]) -> None:
    """Tenant names are unique, allow-lists name served models (once each), and vLLM's own address is
    the launcher's to choose when a gateway fronts it."""
    doc = checked.doc
    items = doc.value(("tenants",))
    n = len(items) if isinstance(items, list) else 0
    if n == 0:
        if isinstance(doc.value(("gateway",)), dict):
            checked.add(("gateway",), "a gateway needs a tenants: section (without tenants vLLM serves alone)")
        return
    for key in ("host", "port"):
        if ("vllm", key) in doc.lines:
            checked.add(("vllm", key), "with tenants, vLLM listens on loopback on a free port; set gateway."
                        f"{key} for the public address instead")
    seen: dict[str, int] = {}
    for i in range(n):
        at = ("tenants", i)
        name = checked.clean_value((*at, "name"))
        if name is not None and name in seen:
            checked.add((*at, "name"), f"tenant name {name!r} is used twice (first on line {seen[name]})")
        elif name is not None:
            seen[name] = doc.line(at) or 0
        models = checked.clean_value((*at, "models"))
        listed: set[str] = set()
        for j, model in enumerate(models if isinstance(models, list) else []):
            if model in listed:
                checked.add((*at, "models", j), f"{model!r} is listed twice")
            elif model not in served:
                near = difflib.get_close_matches(model, sorted(served), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                checked.add((*at, "models", j), f"{model!r} is not a served model{hint}; served: "
                            + ", ".join(sorted(served)))
            listed.add(model)


def _check_gateway_files(checked: Checked[ServeFile], root: Path, manifest: Path) -> None:
    """The gateway's files (keys, usage database, access log) name files: not empty, not a folder, not this
    manifest, and not each other (the keys file is JSON, the usage database SQLite)."""
    if not checked.doc.value(("tenants",)):
        return
    seen: dict[Path, str] = {}
    for key in ("keys_file", "usage_db", "access_log"):
        value = checked.clean_value(("gateway", key))
        if key == "access_log" and not value:  # unset or empty: the log (stderr)
            continue
        if value is None:
            value = getattr(GatewaySection(), key)
        at = ("gateway", key)
        if not str(value).strip():
            checked.add(at, "is empty; name a file (relative to the manifest)")
            continue
        path = gateway_path(value, root).resolve()  # resolved to compare spellings of one file
        if path == manifest:
            checked.add(at, "is this manifest itself; name another file")
        elif path.is_dir():
            checked.add(at, f"{path} is a folder; name a file in it")
        elif path in seen:
            checked.add(at, f"is the same file as gateway.{seen[path]}; give each its own file")
        seen.setdefault(path, key)


_THIS_MACHINE = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})


def _address(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a checked upstream URL, case- and spelling-insensitive (``HTTP://LocalHost:08000``
    is ``http://localhost:8000``). Pure."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _own_ports(checked: Checked[ServeFile]) -> set[int]:
    """The ports this manifest's own listeners take: the router's (``vllm.port``) or, with tenants, the gateway's."""
    ports = {checked.clean_value(("vllm", "port")) or VllmSettings().port}
    if checked.doc.value(("tenants",)):
        ports.add(checked.clean_value(("gateway", "port")) or GatewaySection().port)
    return {p for p in ports if isinstance(p, int)}


def _check_upstreams(checked: Checked[ServeFile]) -> None:
    """Upstream URLs are distinct, and all upstreams use one key: vllm-router forwards the caller's
    ``Authorization`` unchanged to whichever server it picks, so every server must accept the same key."""
    items = checked.doc.value(("upstreams",))
    seen: dict[tuple[str, str, int | None], int] = {}
    envs: dict[str | None, int] = {}
    own = _own_ports(checked)
    for i in range(len(items) if isinstance(items, list) else 0):
        at = ("upstreams", i)
        url = checked.clean_value((*at, "url"))
        if url is not None:
            url = url.rstrip("/")
            key = _address(url)
            if key in seen:
                checked.add((*at, "url"), f"{url} is listed twice (first on line {seen[key]})")
            elif key[1] in _THIS_MACHINE and key[2] in own:
                checked.add((*at, "url"), f"{url} is this server's own public address: it would route to itself")
            seen.setdefault(key, checked.doc.line(at) or 0)
        env = checked.clean_value((*at, "api_key_env"))
        if env is not None:  # a server without a key accepts any
            envs.setdefault(env, i)
    if len(envs) > 1:
        last = max(envs.values())
        checked.add(("upstreams", last, "api_key_env"),
                    "every upstream must use the same api_key_env (vllm-router sends one key to all servers); "
                    "found " + ", ".join(sorted(str(e) for e in envs)))


def load_serve_manifest(path: str | Path) -> ServeManifest:
    """Read and validate a serving manifest.

    Raises:
        ManifestError: every problem of the file at once, each with its line.
    """
    checked = check(load_yaml(path), ServeFile)
    root = Path(path).resolve().parent
    base, adapters = _resolve(checked, root)
    served_name = checked.clean_value(("base", "served_name")) or checked.clean_value(("base", "path"))
    _check_tenants(checked, {served_name, *(a.name for a in adapters)} - {None})
    _check_gateway_files(checked, root, Path(path).resolve())
    _check_upstreams(checked)
    file = checked.result()
    assert base is not None  # the file validated, so its base path resolved
    served_names = (base.served_name, *(a.name for a in adapters))
    gateway = resolve_gateway(file.gateway or GatewaySection(), file.tenants, root, served_names) if file.tenants else None
    upstreams = tuple(Upstream(u.url, u.api_key_env) for u in file.upstreams)
    return ServeManifest(base, adapters, file.vllm, file.extra_args, str(path), gateway, upstreams)


def vllm_settings(**values: Any) -> VllmSettings:
    """:class:`VllmSettings` from keyword values (e.g. a manifest's, overridden by flags).

    Raises:
        InvalidOptionsError: every problem at once.
    """
    try:
        return VllmSettings(**values)
    except ValidationError as exc:
        problems = [f"{format_key_path(p.key_path)}: {p.message}" for p in error_problems(exc, VllmSettings)]
        raise InvalidOptionsError(
            "invalid serve options", problems, fix="fix the flags or the manifest's vllm: section"
        ) from None


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
        problem = name_problem(name)
        if problem:
            problems.append(f"--adapter {item!r}: {problem}")
            continue
        ref, problem = resolve_ref(raw, root)
        if problem:
            problems.append(f"--adapter {name}: {problem}")
        elif ref is not None:
            specs.append(AdapterSpec(name, ref))
    settings = settings or VllmSettings()
    served = served_name or base
    problems += name_problems(served, [a.name for a in specs])
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
    if host is not None and (problem := host_problem(host)):
        problems.append(f"--host: {problem}")
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
                                   settings=vllm_settings(**overrides))
    m = load_serve_manifest(path)
    if m.gateway is not None:  # with tenants, --host/--port are the gateway's public address
        m = replace(m, gateway=replace(m.gateway, **{k: overrides.pop(k) for k in ("host", "port") if k in overrides}))
    settings = vllm_settings(**{**m.vllm.model_dump(), **overrides})
    extra = manifest_from_flags(m.base.ref.value, list(adapters or []), served_name=m.base.served_name,
                                settings=settings, extra_args=m.extra_args) if adapters else None
    all_adapters = m.adapters + (extra.adapters if extra else ())
    names = [a.name for a in all_adapters]
    dup = name_problems(m.base.served_name, names)
    if dup:
        raise InvalidOptionsError("invalid serve options", dup, fix="rename the --adapter")
    gateway = replace(m.gateway, served=(m.base.served_name, *names)) if m.gateway is not None else None
    return replace(m, adapters=all_adapters, vllm=settings, gateway=gateway)

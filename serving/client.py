"""Runtime adapter management on a running vLLM server: list, add (validated first), remove.

vLLM's endpoints: ``GET /v1/models``, ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and
``POST /v1/unload_lora_adapter {"lora_name"}`` (the server must run with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which ``pissa serve`` sets unless the manifest says
``runtime_lora_updating: false``). Before loading, the adapter is checked against the base the
server reports in ``/v1/models`` (its ``root``) with the same rules as at launch, so a bad adapter
never reaches the engine.
"""

from __future__ import annotations

import http.client
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import InvalidOptionsError, ServingError, SourceNotFoundError
from pissa.core.manifests import name_problem
from serving.validate import ValidationReport, read_base, validate_adapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``/v1/models``: the base (``parent`` None) or an adapter (``parent`` = base)."""

    name: str
    root: str
    parent: str | None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def server_url(url: str) -> str:
    """``url`` as the server's root: ``http(s)://host[:port][/prefix]`` (a trailing ``/`` or ``/v1``, which
    OpenAI clients' base URLs end in, is dropped; a prefix, e.g. behind a reverse proxy, is kept).

    Raises:
        InvalidOptionsError: not such an address (no scheme, bad port, credentials, a query), in one line.
    """
    fix = "give --url as http://HOST:PORT, e.g. http://127.0.0.1:8000"
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise InvalidOptionsError(f"--url {url!r} is not a server address ({exc})", [], fix=fix) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = "; it needs http:// or https://" if "://" not in url else ""
        raise InvalidOptionsError(f"--url {url!r} is not an http(s) server address{hint}", [], fix=fix)
    if parts.username is not None or parts.password is not None:
        raise InvalidOptionsError("--url must not hold credentials (user:password@)", [],
                                  fix="pass the API key with --api-key-env instead")
    if parts.query or parts.fragment:
        raise InvalidOptionsError(f"--url {url!r} has a query or fragment; the server's address is needed", [],
                                  fix=fix)
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")).rstrip("/")


def _request(url: str, method: str = "GET", body: dict[str, Any] | None = None, api_key: str | None = None,
             timeout: float = 60.0) -> tuple[int, str, Mapping[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", errors="replace"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace"), {k.lower(): v for k, v in exc.headers.items()}
    except (urllib.error.URLError, OSError) as exc:  # OSError includes TimeoutError (socket.timeout)
        if isinstance(exc, TimeoutError):  # the request was sent, its answer did not come
            unknown = "; whether it acted on the request is unknown" if method != "GET" else ""
            raise ServingError(f"{url} did not answer within {timeout:.0f} s{unknown}",
                               fix="check the server's log (`pissa adapters list` shows what it serves)") from None
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):  # while connecting (wrapped in URLError)
            raise ServingError(f"{url} did not answer within {timeout:.0f} s",
                               fix="check the server's log and --url") from None
        raise ServingError(f"cannot reach {url}: {reason}",
                           fix="check --url and that `pissa serve` is running") from None
    except http.client.HTTPException as exc:  # not HTTP at all, or a body cut short
        raise ServingError(f"{url} did not answer HTTP ({type(exc).__name__})",
                           fix="check --url: is this `pissa serve` (vLLM)?") from None


@dataclass(frozen=True)
class ReplicaAnswer:
    """One replica's answer to an adapter load/unload that ``pissa serve`` sent to every replica."""

    url: str
    status: int | None  # None: unreachable (a local replica gets the runtime adapters when restarted)
    message: str

    def __str__(self) -> str:
        return f"{self.url}: {self.status or 'unreachable'} {self.message.strip()}"


def replica_answers(text: str) -> list[ReplicaAnswer]:
    """The per-replica answers in a gateway's fan-out body (``{"message", "replicas": [...]}``); [] otherwise."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    items = data.get("replicas") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    return [ReplicaAnswer(str(r.get("url")), r.get("status"), str(r.get("message", ""))) for r in items
            if isinstance(r, dict)]


def _server_message(text: str) -> str:
    """vLLM's error text from a JSON body (``{"error": {"message"}}`` or ``{"message"}``), else the body; on one
    line, at most :data:`MESSAGE_CHARS` characters (an HTML error page is not worth printing)."""
    return _one_line(_message_of(text))


MESSAGE_CHARS = 300


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MESSAGE_CHARS else flat[: MESSAGE_CHARS - 1] + "…"


def _message_of(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return "(an HTML page)" if text.lstrip()[:1] == "<" else text
    if isinstance(data, dict):
        per_replica = replica_answers(text)
        if per_replica:
            return f"{data.get('message')}: " + "; ".join(map(str, per_replica))
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
    return text


def list_models(url: str, *, api_key: str | None = None) -> list[ServedModel]:
    """The served models (base first, then adapters).

    Raises:
        ServingError: unreachable server or an error answer.
    """
    status, text, _ = _request(server_url(url) + "/v1/models", api_key=api_key)
    if status != 200:
        raise ServingError(f"GET /v1/models failed with HTTP {status}: {_server_message(text)}",
                           fix="check --url and --api-key-env")
    try:
        data = json.loads(text)
        items = data["data"]
        models = [ServedModel(str(m["id"]), str(m.get("root") or ""), m.get("parent")) for m in items]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ServingError(f"{url} is not a vLLM server: /v1/models did not answer a model list "
                           f"({_one_line(text)[:80] or 'an empty body'})",
                           fix="check --url: is this `pissa serve` (vLLM)?") from None
    return sorted(models, key=lambda m: (m.is_adapter, m.name))


def check_runtime_adapter(url: str, name: str, path: str | Path, *, api_key: str | None = None,
                          aliases: Sequence[str] = ()) -> ValidationReport:
    """Validate ``path`` against the base the server at ``url`` serves (see :mod:`serving.validate`).

    The served base's identities are its ``root`` (what vLLM was started with) and ``aliases``
    (give the manifest's ``base.aliases`` again: the server does not know them).

    Raises:
        AdapterValidationError: every problem of the adapter.
        ServingError: the server is unreachable or serves no base.
        SourceNotFoundError: ``path`` does not exist.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise SourceNotFoundError(f"adapter path {folder} does not exist", path=str(folder),
                                  fix="give the folder that holds adapter_config.json")
    models = list_models(url, api_key=api_key)
    bases = [m for m in models if not m.is_adapter]
    if not bases:
        raise ServingError(f"{url} lists no base model", fix="is this a vLLM server?")
    if any(m.name == name for m in models):
        raise ServingError(f"{name!r} is already served at {url}",
                           fix="pick another name, or `pissa adapters remove` it first")
    root = bases[0].root
    if not root:
        raise ServingError(f"{url} reports no path for its base {bases[0].name!r}, so the adapter cannot be checked "
                           "against it", fix="check --url: is this `pissa serve` (vLLM)?")
    base = read_base(root, is_local=Path(root).is_dir(), aliases=aliases)
    return validate_adapters(base, [(name, str(folder.resolve()), True)])


def add_adapter(url: str, name: str, path: str | Path, *, api_key: str | None = None,
                validate: bool = True, aliases: Sequence[str] = (),
                tenants: Sequence[str] = (),
                on_replica: Callable[[ReplicaAnswer], None] | None = None) -> ValidationReport | None:
    """Validate, then load ``path`` as ``name`` on the running server.

    With ``tenants`` (a ``pissa serve`` gateway, admin key), the adapter is granted to those tenants at
    once; the gateway keeps the grant in its ``usage_db`` for the next start. With replicas, the gateway
    loads it on each; ``on_replica`` gets each replica's answer.

    Returns:
        the validation report (None when ``validate`` is false).

    Raises:
        AdapterValidationError: refused before loading (nothing sent to the engine).
        ServingError: the server refused it (its message included) or is unreachable.
    """
    problem = name_problem(name)
    if problem:  # a served name goes into vLLM's --lora-modules at the next start: "x=y" or "a,b" would break it
        raise InvalidOptionsError(f"adapter name {problem}", [], fix="rename it")
    report = check_runtime_adapter(url, name, path, api_key=api_key, aliases=aliases) if validate else None
    lora_path = str(Path(path).expanduser().resolve())
    body: dict[str, Any] = {"lora_name": name, "lora_path": lora_path}
    if tenants:
        body["tenants"] = list(tenants)
    status, text, headers = _request(server_url(url) + "/v1/load_lora_adapter", "POST", body, api_key=api_key,
                                     timeout=300)
    if status != 200:
        hint = ("start the server with runtime_lora_updating: true (VLLM_ALLOW_RUNTIME_LORA_UPDATING)"
                if status == 404 and "Not Found" in text else "read the server's message")
        raise ServingError(f"server refused adapter {name!r} (HTTP {status}): {_server_message(text)}", fix=hint)
    if tenants and headers.get("x-pissa-granted") is None:
        # Not a gateway: nobody is granted it, and the server serves it to every caller. Take it back.
        _request(server_url(url) + "/v1/unload_lora_adapter", "POST", {"lora_name": name}, api_key=api_key)
        raise ServingError(f"{url} is not a pissa gateway, so no tenant could be granted {name!r}; it was unloaded "
                           "again", fix="give --url of `pissa serve` with tenants:, or drop --tenant")
    for answer in replica_answers(text):
        if on_replica is not None:
            on_replica(answer)
    logger.info("loaded adapter %s from %s (granted to: %s)", name, lora_path, ", ".join(tenants) or "-")
    return report


def remove_adapter(url: str, name: str, *, api_key: str | None = None,
                   on_replica: Callable[[ReplicaAnswer], None] | None = None) -> None:
    """Unload adapter ``name`` from the running server.

    Raises:
        ServingError: unknown name, or the server refused.
    """
    status, text, _ = _request(server_url(url) + "/v1/unload_lora_adapter", "POST", {"lora_name": name},
                            api_key=api_key)
    if status != 200:
        raise ServingError(f"server could not remove adapter {name!r} (HTTP {status}): {_server_message(text)}",
                           fix="`pissa adapters list` shows what is served")
    for answer in replica_answers(text):
        if on_replica is not None:
            on_replica(answer)
    logger.info("unloaded adapter %s", name)

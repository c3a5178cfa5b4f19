"""The Hugging Face Hub client of the pipeline: endpoint, token, downloads, and error mapping.

Everything of ours that talks to the Hub goes through huggingface_hub and its cache, so ``pissa
convert hub:ORG/NAME``, the validation of serving manifests that name hub ids (serving.validate) and
``pissa push`` share one client, one cache and one set of errors (vLLM then loads those hub ids
itself, with its own huggingface_hub client):

- endpoint: ``HF_ENDPOINT`` read when called (so a stand-in started later is honoured), else the
  library's default (https://huggingface.co);
- token: ``HF_TOKEN`` if set, else the token saved by ``hf auth login`` (huggingface_hub's own
  lookup); public repos need none;
- errors: every failure becomes one :class:`pissa.core.errors.HubError` that names the repo, the HTTP
  status and what to do (:func:`hub_error`).

Downloads fetch only what a conversion reads (:func:`checkpoint_files`): config, generation config,
tokenizer files, the README (licence metadata) and ONE weight format (safetensors, else PyTorch
``.bin``, else a single ``.gguf``), never ONNX/Flax/TF copies or other quantizations.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pissa.core.errors import HubError, SourceNotFoundError

logger = logging.getLogger(__name__)

# Top-level files every conversion wants besides the weights (exact names or fnmatch patterns).
METADATA_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    "LICENSE*",
)


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a valid ``ORG/NAME`` Hub repo id (None: it is one).

    huggingface_hub's own rule (:func:`huggingface_hub.utils.validate_repo_id`), plus the
    namespace it makes optional: a bundle or adapter always lives under an owner.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        return f"{repo_id!r} is not of the form ORG/NAME"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return f"{repo_id!r} is not a valid Hub repo id ({str(exc).splitlines()[0]})"
    return None


def hub_endpoint() -> str:
    """The Hub URL in use: ``HF_ENDPOINT`` (read now) or huggingface_hub's default."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    """``HF_TOKEN`` if set, else the saved login token, else None (huggingface_hub's lookup)."""
    from huggingface_hub import get_token

    token: str | None = get_token()
    return token


def hub_api(endpoint: str | None = None, token: str | None = None) -> Any:
    """An ``HfApi`` bound to :func:`hub_endpoint` and :func:`hub_token` unless given."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint or hub_endpoint(), token=token or hub_token())


def checkpoint_files(repo_files: Iterable[str], *, repo_id: str = "", filename: str | None = None) -> list[str]:
    """Which files of a repo a conversion needs (pure: names in, names out).

    Args:
        repo_files: every file of the repo (``siblings`` of the model info).
        repo_id: for messages.
        filename: one weight file to take (e.g. a ``.gguf`` among several quantizations).

    Returns:
        the metadata files present plus ONE weight format: every top-level ``*.safetensors`` (and
        its index), else every ``pytorch_model*.bin`` (and index), else the single top-level
        ``.gguf``.

    Raises:
        SourceNotFoundError: no weights, ``filename`` missing, or several GGUF files and no
            ``filename`` to choose one.
    """
    files = sorted(set(repo_files))
    top = [f for f in files if "/" not in f]
    wanted = [f for f in top if any(fnmatch.fnmatchcase(f, p) for p in METADATA_PATTERNS)]
    if filename is not None:
        if filename not in files:
            raise SourceNotFoundError(
                f"{repo_id} has no file {filename!r}",
                path=f"{repo_id}/{filename}",
                fix=f"pick one of: {', '.join(f for f in files if f.endswith(('.gguf', '.safetensors')))}",
            )
        return sorted({*wanted, filename})
    safetensors = [f for f in top if f.endswith(".safetensors") or f.endswith(".safetensors.index.json")]
    pickles = [f for f in top if fnmatch.fnmatchcase(f, "pytorch_model*.bin") or f == "pytorch_model.bin.index.json"]
    ggufs = [f for f in top if f.endswith(".gguf")]
    if safetensors:
        weights = safetensors
    elif pickles:
        weights = pickles
    elif len(ggufs) == 1:
        weights = ggufs
    elif ggufs:
        raise SourceNotFoundError(
            f"{repo_id} holds {len(ggufs)} GGUF files: {', '.join(ggufs)}",
            path=repo_id,
            fix=f"name the one to convert: hub:{repo_id}/FILE.gguf",
        )
    else:
        raise SourceNotFoundError(
            f"{repo_id} has no weights this tool reads (no *.safetensors, pytorch_model*.bin or *.gguf)",
            path=repo_id,
            fix="check the repo id, or convert a local folder",
        )
    return sorted({*wanted, *weights})


def download_checkpoint(
    repo_id: str, revision: str | None, cache_dir: Path | None = None, *, filename: str | None = None
) -> Path:
    """Download what a conversion needs from a model repo into the huggingface_hub cache.

    Asks the Hub which files the repo holds at ``revision``, then ``snapshot_download`` s only
    :func:`checkpoint_files` of them. Re-running reuses the cache (files are checked by etag).
    When the Hub cannot be reached (offline, ``HF_HUB_OFFLINE=1``, network down) a complete cached
    snapshot of that revision is used instead.

    Args:
        repo_id: ``ORG/NAME``.
        revision: branch, tag or commit (None: ``main``).
        cache_dir: huggingface_hub cache (None: its default, ``HF_HUB_CACHE``).
        filename: download this weight file (e.g. one ``.gguf``) instead of choosing.

    Returns:
        the local snapshot folder (``.../snapshots/<commit>``).

    Raises:
        HubError: auth, missing repo or revision, server or network failure (one line + fix).
        SourceNotFoundError: the repo has no weights this tool reads.
    """
    return _download(
        repo_id, revision, cache_dir,
        choose=lambda files: checkpoint_files(files, repo_id=repo_id, filename=filename),
    )


def download_repo(
    repo_id: str,
    revision: str | None = None,
    cache_dir: Path | None = None,
    *,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Download a whole repo (a pushed bundle or adapter) into the cache; same errors and fallback.

    Args:
        repo_id: ``ORG/NAME``.
        revision: branch, tag or commit (None: ``main``).
        cache_dir: huggingface_hub cache (None: its default).
        allow_patterns: restrict to these fnmatch patterns (None: every file).

    Returns:
        the local snapshot folder.

    Raises:
        HubError: as :func:`download_checkpoint`.
    """
    return _download(repo_id, revision, cache_dir, choose=lambda files: allow_patterns)


def _download(
    repo_id: str, revision: str | None, cache_dir: Path | None, *, choose: Callable[[list[str]], list[str] | None]
) -> Path:
    """``snapshot_download`` of the files ``choose`` picks from the repo's file list (None: all of them).

    The repo is asked for first: snapshot_download hides HTTP errors (401, 404, 5xx) behind a
    generic "cannot find the files" error when it falls back to the cache. When the Hub cannot be
    reached, the choice is made from the cached snapshot of that revision instead.
    """
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    endpoint = hub_endpoint()
    token = hub_token()
    rev = revision or "main"
    cache = str(cache_dir) if cache_dir is not None else None
    action = f"downloading {repo_id}@{rev}"
    try:
        info = hub_api(endpoint, token).repo_info(repo_id, revision=rev)
        wanted = choose([s.rfilename for s in info.siblings or []])
        logger.info("downloading %s of %s@%s from %s", f"{len(wanted)} files" if wanted is not None else "every file",
                    repo_id, rev, endpoint)
        folder = snapshot_download(
            repo_id, revision=rev, cache_dir=cache, allow_patterns=wanted, endpoint=endpoint, token=token
        )
    except Exception as exc:  # noqa: BLE001 - mapped below; unknown errors re-raised
        if not _is_network_error(exc):
            raise hub_error(exc, repo_id=repo_id, action=action, endpoint=endpoint, revision=rev) from exc
        logger.warning("cannot reach %s (%s): looking for a cached copy of %s@%s", endpoint, exc, repo_id, rev)
        try:
            cached = [f.path for f in get_cached_repo_tree(repo_id, revision=rev, cache_dir=cache)]
            folder = snapshot_download(
                repo_id, revision=rev, cache_dir=cache, allow_patterns=choose(cached), local_files_only=True
            )
        except (CachedRepoTreeNotFoundError, LocalEntryNotFoundError):  # not cached: the network problem
            raise hub_error(exc, repo_id=repo_id, action=action, endpoint=endpoint, revision=rev) from exc
        logger.warning("using the cached snapshot %s", folder)
    return Path(folder)


# --- errors -------------------------------------------------------------------------------------
def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            mod = __import__(module)
            types.append(getattr(mod, name))
        except (ImportError, AttributeError):
            continue
    from huggingface_hub.errors import OfflineModeIsEnabled

    types.append(OfflineModeIsEnabled)
    return tuple(types)


def _is_network_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    types = _network_error_types()
    while cur is not None and id(cur) not in seen:  # the client sometimes wraps them
        if isinstance(cur, types):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(exc, LocalEntryNotFoundError)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return int(code) if isinstance(code, int) else None


def _server_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    msg = headers.get("X-Error-Message") if hasattr(headers, "get") else None
    return f": {msg}" if msg else ""


def hub_error(
    exc: BaseException, *, repo_id: str, action: str, endpoint: str | None = None, revision: str | None = None,
    upload: bool = False,
) -> HubError:
    """Map any exception raised by huggingface_hub to a :class:`HubError` with a fix line.

    Args:
        exc: what the client raised (HTTP error, network error, offline mode, ...).
        repo_id: the repo concerned.
        action: what was being done, e.g. ``"pushing to ORG/NAME"`` (used in the message).
        endpoint: the Hub URL (default: :func:`hub_endpoint`).
        revision: the revision concerned, for "revision not found".
        upload: the action sends files (offline mode then has no cache to fall back on).

    Returns:
        the error to raise (``status`` is the HTTP status when there was one).
    """
    from huggingface_hub import errors as hf_errors

    endpoint = endpoint or hub_endpoint()
    status = _status(exc)
    where = f"{action} ({endpoint})"
    if isinstance(exc, HubError):
        return exc
    if _is_network_error(exc) and status is None:
        from huggingface_hub import constants

        offline = isinstance(exc, hf_errors.OfflineModeIsEnabled) or bool(constants.HF_HUB_OFFLINE)
        if offline and upload:
            return HubError(f"{where}: offline mode is on (HF_HUB_OFFLINE), and pushing needs the Hub",
                            repo_id=repo_id, fix="unset HF_HUB_OFFLINE to push")
        if offline:
            return HubError(
                f"{where}: offline mode is on (HF_HUB_OFFLINE) and {repo_id} is not in the cache",
                repo_id=repo_id,
                fix="unset HF_HUB_OFFLINE to download it, or use a local folder",
            )
        return HubError(
            f"{where}: cannot reach the Hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            repo_id=repo_id,
            fix="check the network connection and HF_ENDPOINT, then re-run (finished files are not redone)",
        )
    if isinstance(exc, hf_errors.GatedRepoError):
        return HubError(
            f"{where}: {repo_id} is gated and this account has not been granted access (HTTP {status})",
            repo_id=repo_id,
            status=status,
            fix=f"accept the conditions on {endpoint}/{repo_id} and use that account's token (HF_TOKEN)",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return HubError(
            f"{where}: revision {revision!r} does not exist in {repo_id}",
            repo_id=repo_id,
            status=status,
            fix="check the branch, tag or commit (--revision)",
        )
    if isinstance(exc, hf_errors.EntryNotFoundError):  # RemoteEntryNotFoundError (local: handled above)
        return HubError(
            f"{where}: a file is missing in {repo_id}{_server_message(exc)}",
            repo_id=repo_id,
            status=status,
            fix="check the repo's files and the revision",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        has_token = hub_token() is not None
        return HubError(
            f"{where}: repository {repo_id} not found (or private and not visible to "
            f"{'this token' if has_token else 'anonymous users'}) (HTTP {status})",
            repo_id=repo_id,
            status=status,
            fix="check the repo id"
            + ("" if has_token else "; for a private repo set HF_TOKEN or run `hf auth login`"),
        )
    if status == 401:
        has_token = hub_token() is not None
        return HubError(
            f"{where}: authentication failed (HTTP 401){_server_message(exc)}",
            repo_id=repo_id,
            status=status,
            fix="set HF_TOKEN to a valid token with write access (or run `hf auth login`)"
            if has_token
            else "no token found: set HF_TOKEN or run `hf auth login`",
        )
    if status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your"
        return HubError(
            f"{where}: permission denied on {repo_id} (HTTP 403){_server_message(exc)}",
            repo_id=repo_id,
            status=status,
            fix=f"use a token with write access to the {namespace!r} namespace, or push to a repo you own",
        )
    if status is not None and status >= 500:
        return HubError(
            f"{where}: the Hub failed with HTTP {status}{_server_message(exc)}",
            repo_id=repo_id,
            status=status,
            fix="retry later: re-running resumes (files already uploaded or downloaded are skipped)",
        )
    if status is not None:
        return HubError(
            f"{where}: the Hub refused the request (HTTP {status}){_server_message(exc)}",
            repo_id=repo_id,
            status=status,
            fix="check the repo id, revision and options; PISSA_DEBUG=1 shows the full response",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError | ValueError):
        return HubError(f"{where}: {exc}", repo_id=repo_id, fix="check the repo id and options")
    raise exc

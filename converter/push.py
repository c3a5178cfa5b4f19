"""Publish a bundle or an exported adapter to the Hub: verify, model card, one commit.

Order of operations (nothing is published unless every step before it passed):

1. recognise the folder: a PiSSA bundle (``pissa.json`` with ``format: pissa-bundle``), a PEFT
   LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) or a merged model
   (``pissa export --merge``: ``pissa_export.json`` with ``mode: merged``);
2. verify it: a bundle with ``converter.verify.verify_bundle`` (checksums, adapter vs records,
   maths); an adapter structurally (:func:`check_adapter_folder`) and against any checksum record
   it carries; a merged model against the checksums of its ``pissa_export.json``;
3. the model card of a bundle is regenerated from its ``pissa.json`` with the converter's card
   renderer (the text ``pissa convert`` writes; it is checksummed in ``pissa.json``, so it is
   rendered exactly as convert did and the published bundle still verifies after a download); an
   export's README is uploaded as it is;
4. ``create_repo(exist_ok=True)`` (+ the branch for ``--revision``), then ``get_paths_info`` of the
   branch: a file whose size and sha256 (LFS) or git blob sha1 (other files) equal the remote copy's
   is unchanged and not sent; ONE ``create_commit`` of the others (the same call ``upload_folder``
   makes, with the card given as bytes so the local folder is never modified), and no commit at all
   when nothing changed. The commit is atomic on the Hub side: a failure leaves the previous
   revision in place. Re-running resumes: LFS objects already uploaded are not sent again.

The card renderer and the bundle verifier are injectable (tests; other front-ends).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import HubError, SourceNotFoundError, VerificationError
from pissa.core.formats import adapter as adapter_format
from pissa.core.formats import bundle as bundle_format
from pissa.core.formats import export as export_format
from pissa.core.formats import model as model_format
from pissa.core.formats import run as run_format
from pissa.core.formats.safetensors import tensor_shapes
from pissa.core.hashing import git_blob_sha1, sha256_file
from pissa.core.jsonio import read_json

logger = logging.getLogger(__name__)

CardRenderer = Callable[..., str]
BundleVerifier = Callable[[Path], Any]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PushReport:
    """What ``push`` did.

    Attributes:
        path: the local folder.
        repo_id: the target repo.
        kind: ``bundle``, ``adapter`` or ``merged``.
        revision: the branch committed to (or the PR's base branch).
        commit_oid: the resulting commit (the existing head when nothing changed).
        commit_url: its URL.
        pr_url: the pull request, with ``create_pr``.
        uploaded: files sent in this commit (new or changed).
        unchanged: files already identical on the Hub (not re-sent).
        bytes_uploaded: their total size.
        seconds: wall time.
    """

    path: str
    repo_id: str
    kind: str
    revision: str
    commit_oid: str | None
    commit_url: str | None
    pr_url: str | None
    uploaded: tuple[str, ...]
    unchanged: tuple[str, ...]
    bytes_uploaded: int
    seconds: float


def detect_kind(path: Path) -> str:
    """``bundle``, ``adapter`` or ``merged`` (a ``pissa export --merge`` model).

    Raises:
        SourceNotFoundError: the folder does not exist.
        VerificationError: it is neither a bundle nor a PEFT adapter folder.
    """
    if not path.is_dir():
        raise SourceNotFoundError(f"{path} is not a folder", path=str(path), fix="give a bundle or adapter folder")
    record = path / bundle_format.RECORD
    if record.is_file():
        try:
            data = read_json(record)
        except (OSError, ValueError) as exc:
            raise VerificationError(f"{record} is not valid JSON: {exc}", [], fix="re-run pissa convert") from None
        if isinstance(data, dict) and data.get("format") == bundle_format.FORMAT:
            return "bundle"
    if (path / adapter_format.CONFIG).is_file():
        return "adapter"
    export = path / export_format.RECORD
    if export.is_file() and (path / model_format.CONFIG).is_file():
        try:
            if read_json(export).get("mode") == "merged":
                return "merged"
        except (OSError, ValueError):
            pass
    if (path / run_format.RECORD).is_file():  # a run folder of `pissa train`
        raise VerificationError(f"{path} is a training run, not something to publish", [],
                                fix=f"export it first (`pissa export {path} --out LORA`), then push LORA")
    raise VerificationError(
        f"{path} is neither a PiSSA bundle (pissa.json), a LoRA adapter (adapter_config.json) "
        "nor a merged export (pissa_export.json)",
        [],
        fix="push the output of `pissa convert` or `pissa export`",
    )


def check_adapter_folder(path: Path) -> list[str]:
    """Every structural problem of a PEFT LoRA adapter folder (empty list: fine).

    Checks: ``adapter_config.json`` parses and says ``peft_type: LORA`` with a positive ``r``;
    ``adapter_model.safetensors`` has a readable header; every ``lora_A`` [r, in] has its ``lora_B``
    [out, r] with the same r; and every ``{"files": {name: sha256}}`` record in a top-level JSON
    file matches the files on disk.
    """
    problems: list[str] = []
    try:
        config = read_json(path / adapter_format.CONFIG)
    except (OSError, ValueError) as exc:
        return [f"adapter_config.json: cannot be read as JSON: {exc}"]
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"adapter_config.json: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        problems.append(f"adapter_config.json: r must be a positive integer, got {r!r}")
    weights = path / adapter_format.WEIGHTS
    if not weights.is_file():
        problems.append("adapter_model.safetensors is missing")
        return problems
    try:
        shapes = tensor_shapes(weights)
    except (OSError, ValueError) as exc:
        return [*problems, f"adapter_model.safetensors: unreadable: {exc}"]
    a_keys = [k for k in shapes if ".lora_A." in k]
    if not a_keys:
        problems.append("adapter_model.safetensors: no lora_A/lora_B tensors")
    for a in a_keys:
        b = a.replace(".lora_A.", ".lora_B.")
        if b not in shapes:
            problems.append(f"{a}: has no matching {b}")
            continue
        ra, rb = shapes[a][0], shapes[b][-1]
        if ra != rb:
            problems.append(f"{a}: rank {ra} but {b} has rank {rb}")
    problems += _check_recorded_checksums(path)
    return problems


def check_merged_folder(path: Path) -> list[str]:
    """Problems of a merged export (``pissa export --merge``): every weight file checksummed and intact."""
    record = read_json(path / export_format.RECORD)
    files = record.get("files") or {}
    problems = [
        f"{rel}: not listed in pissa_export.json"
        for rel in local_files(path)
        if rel.endswith(".safetensors") and rel not in files
    ]
    if not any(name.endswith(".safetensors") for name in files):
        problems.append("pissa_export.json lists no weight files")
    return problems + _check_recorded_checksums(path)


def _check_recorded_checksums(path: Path) -> list[str]:
    problems: list[str] = []
    for record in sorted(path.glob("*.json")):
        try:
            data = read_json(record)
        except (OSError, ValueError):
            continue
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            continue
        for name, digest in files.items():
            if not (isinstance(digest, str) and _SHA256.match(digest)):
                continue
            target = path / name
            if not target.is_file():
                problems.append(f"{name}: listed in {record.name} but missing")
            elif sha256_file(target) != digest:
                problems.append(f"{name}: sha256 differs from {record.name}")
    return problems


def _default_verifier(path: Path) -> Any:
    from converter.verify import verify_bundle

    return verify_bundle(path)


def _default_card(record: dict[str, Any], *, repo_id: str | None = None) -> str:
    from converter.card import render_model_card

    return render_model_card(record, repo_id=repo_id)


def _raise_if_failed(path: Path, result: Any) -> None:
    """Accept a verifier that raises, or one that returns a report with ``ok`` / ``problems``."""
    if result is None or result is True:
        return
    if result is False:
        raise VerificationError(f"{path} failed verification", [], fix="re-run pissa verify for details")
    problems = list(getattr(result, "problems", None) or [])
    ok = getattr(result, "ok", not problems)
    if not ok or problems:
        raise VerificationError(
            f"{path} failed verification; nothing was pushed",
            [f"{path}: {p}" for p in problems],
            fix="re-run `pissa convert` (or --resume) and `pissa verify` before pushing",
        )


def local_files(path: Path) -> list[str]:
    """Relative paths of every file to publish (hidden files/folders and temp files excluded)."""
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts) or f.name.endswith((".tmp", ".partial")):
            continue
        out.append(rel.as_posix())
    return out


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    card_renderer: CardRenderer | None = None,
    verifier: BundleVerifier | None = None,
) -> PushReport:
    """Verify ``path`` and publish it to ``repo_id`` in one commit (see the module docstring).

    Args:
        path: a bundle (``pissa convert``) or an adapter folder (``pissa export``).
        repo_id: ``ORG/NAME``; created if missing (``private`` then applies).
        private: create the repo private (ignored when it exists).
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        create_pr: open a pull request against ``revision`` instead of committing to it.
        message: commit message (default names the kind, rank and source).
        card_renderer: ``f(pissa_record, repo_id=...) -> str`` (default: converter.card).
        verifier: ``f(bundle_path)`` raising or returning a report (default: verify_bundle).

    Returns:
        a :class:`PushReport`.

    Raises:
        VerificationError: the folder does not verify; nothing was sent.
        HubError: auth (401/403), missing repo, server or network failure; the Hub keeps its
            previous revision; re-running resumes.
    """
    from huggingface_hub import CommitOperationAdd

    from pissa.core.hub import hub_api, hub_endpoint, hub_error

    start = time.perf_counter()
    folder = Path(path)
    raise_for_hub_id(repo_id)
    kind = detect_kind(folder)
    card: bytes | None = None
    if kind == "bundle":
        _raise_if_failed(folder, (verifier or _default_verifier)(folder))
        record = bundle_format.read_record(folder)
        # The card is checksummed in pissa.json when convert wrote it: regenerate it exactly as
        # convert did (no repo id), so the published bundle still verifies after a download.
        checksummed = bundle_format.CARD in (record.get("files") or {})
        card = (card_renderer or _default_card)(record, repo_id=None if checksummed else repo_id).encode()
        default_message = f"Upload PiSSA bundle (r={record.get('adapter', {}).get('r')}) of {record.get('base_model')}"
    else:
        problems = check_adapter_folder(folder) if kind == "adapter" else check_merged_folder(folder)
        if problems:
            raise VerificationError(
                f"{folder} is not a valid {'LoRA adapter' if kind == 'adapter' else 'merged export'}; "
                "nothing was pushed",
                [f"{folder}: {p}" for p in problems],
                fix="re-run `pissa export`",
            )
        default_message = (
            "Upload LoRA adapter exported from a PiSSA run" if kind == "adapter" else "Upload merged PiSSA model"
        )

    files = local_files(folder)
    operations = []
    sizes: dict[str, int] = {}
    for rel in files:
        if rel == bundle_format.CARD and card is not None:
            continue
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)))
        sizes[rel] = (folder / rel).stat().st_size
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=bundle_format.CARD, path_or_fileobj=card))
        sizes[bundle_format.CARD] = len(card)

    branch = revision or "main"
    endpoint = hub_endpoint()
    api = hub_api(endpoint)
    action = f"pushing {folder} to {repo_id}@{branch}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        remote = {
            entry.path: entry
            for entry in api.get_paths_info(repo_id, [op.path_in_repo for op in operations], revision=branch)
        }
        changed = [op for op in operations if not same_content(_content(op), remote.get(op.path_in_repo))]
        if changed:
            info = api.create_commit(
                repo_id,
                changed,
                commit_message=message or default_message,
                revision=branch,
                create_pr=create_pr,
            )
            commit_oid, commit_url, pr_url = info.oid, info.commit_url, info.pr_url
        else:  # every file is already there: no (empty) commit
            commit_oid, commit_url, pr_url = api.repo_info(repo_id, revision=branch).sha, None, None
    except (VerificationError, SourceNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - every client failure becomes one HubError
        raise hub_error(exc, repo_id=repo_id, action=action, endpoint=endpoint, revision=branch, upload=True) from exc

    uploaded = [op.path_in_repo for op in changed]
    unchanged = sorted({op.path_in_repo for op in operations} - set(uploaded))
    report = PushReport(
        path=str(folder),
        repo_id=repo_id,
        kind=kind,
        revision=branch,
        commit_oid=commit_oid,
        commit_url=commit_url,
        pr_url=pr_url,
        uploaded=tuple(sorted(uploaded)),
        unchanged=tuple(sorted(unchanged)),
        bytes_uploaded=sum(sizes[p] for p in uploaded),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "pushed %s to %s@%s: %d files uploaded, %d unchanged", folder, repo_id, branch, len(uploaded), len(unchanged)
    )
    return report


def same_content(local: str | bytes, remote: Any) -> bool:
    """Whether a local file (path) or content (bytes) is identical to a remote file of ``get_paths_info``.

    The Hub identifies an LFS file by its sha256 (``remote.lfs.sha256``) and any other file by its
    git blob sha1 (``remote.blob_id``); sizes are compared first, so nothing is hashed for a file
    that changed size.
    """
    if remote is None or getattr(remote, "size", None) is None:
        return False
    size = len(local) if isinstance(local, bytes) else Path(local).stat().st_size
    if size != remote.size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        digest = hashlib.sha256(local).hexdigest() if isinstance(local, bytes) else sha256_file(local)
        return bool(digest == lfs.sha256)
    return bool(git_blob_sha1(local if isinstance(local, bytes) else Path(local)) == remote.blob_id)


def _content(op: Any) -> str | bytes:
    """What a ``CommitOperationAdd`` built above uploads: a file path or the card's bytes."""
    content = op.path_or_fileobj
    assert isinstance(content, str | bytes), type(content)
    return content


def raise_for_hub_id(repo_id: str) -> None:
    """Reject a repo id that cannot be valid (``ORG/NAME``, huggingface_hub's rule), before any request."""
    from pissa.core.hub import repo_id_problem

    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise HubError(problem, repo_id=repo_id, fix="use ORG/NAME (letters, digits, '-', '_', '.')")

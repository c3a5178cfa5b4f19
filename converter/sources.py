"""Turn a SOURCE argument (folder, ``.gguf`` file, hub id) into a local checkpoint folder.

- A folder is used as it is.
- A ``.gguf`` file is dequantized once through transformers' GGUF loader into a float32
  safetensors folder in the cache (``$PISSA_CACHE`` or ``~/.cache/pissa``), keyed by the file's
  sha256, so converting it again (other ranks, a zoo) reuses it.
- ``hub:ORG/NAME`` or ``ORG/NAME`` that is not a local path is downloaded with huggingface_hub
  (``pissa.core.hub.download_checkpoint``: revision, HF_TOKEN and HF_ENDPOINT honoured). A repo
  whose only weights are one ``.gguf`` file, or ``hub:ORG/NAME/FILE.gguf`` (one file of a repo that
  holds several quantizations), is downloaded and then dequantized exactly as a local ``.gguf``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError, SourceNotFoundError
from pissa.core.formats import model as model_format
from pissa.core.hashing import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A source made local.

    Attributes:
        folder: local checkpoint folder.
        kind: ``local``, ``gguf`` or ``hub``.
        base_model: how the original model is named in records and cards (repo id or path).
        default_dtype: residual dtype when ``--dtype`` is not given (None: keep each tensor's).
        record: provenance for pissa.json (path / repo id and revision / gguf file and its sha256).
    """

    folder: Path
    kind: str
    base_model: str
    default_dtype: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    return Path(os.environ.get("PISSA_CACHE") or Path.home() / ".cache" / "pissa")


def resolve_source(source: str, *, revision: str | None = None) -> ResolvedSource:
    """Make ``source`` local (see the module docstring).

    Raises:
        SourceNotFoundError: nothing at that path and not a hub id.
        CorruptCheckpointError: a ``.gguf`` file transformers cannot read.
        HubError: the download failed.
    """
    if source.startswith("hub:"):
        repo_id, filename = split_hub_source(source[4:])
        return _from_hub(repo_id, revision, filename)
    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource(path.resolve(), "local", str(path.resolve()), record={"path": str(path.resolve())})
    if path.is_file() and path.suffix == ".gguf":
        return materialize_gguf(path)
    if path.exists():
        raise SourceNotFoundError(
            f"{source} is a file but not a .gguf checkpoint",
            path=source,
            fix="give a model folder (config.json + safetensors), a .gguf file, or a hub id",
        )
    if _looks_like_repo_id(source):
        return _from_hub(source, revision)
    raise SourceNotFoundError(
        f"{source} does not exist",
        path=source,
        fix="give a model folder, a .gguf file, hub:ORG/NAME or hub:ORG/NAME/FILE.gguf",
    )


def _looks_like_repo_id(text: str) -> bool:
    from pissa.core.hub import repo_id_problem

    return not text.startswith(("/", "~", ".")) and repo_id_problem(text) is None


def split_hub_source(text: str) -> tuple[str, str | None]:
    """``ORG/NAME`` -> ``("ORG/NAME", None)``; ``ORG/NAME/PATH.gguf`` -> ``("ORG/NAME", "PATH.gguf")``.

    Raises:
        SourceNotFoundError: not a valid repo id, or a path in the repo that is not a ``.gguf`` file.
    """
    from pissa.core.hub import repo_id_problem

    parts = text.split("/", 2)
    repo_id = "/".join(parts[:2])
    filename = parts[2] if len(parts) == 3 else None
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise SourceNotFoundError(
            f"hub:{text}: {problem}", path=text, fix="give hub:ORG/NAME or hub:ORG/NAME/FILE.gguf"
        )
    if filename is not None and not filename.endswith(".gguf"):
        raise SourceNotFoundError(
            f"hub:{text}: only a .gguf file of a repo can be named ({filename!r} is not one)",
            path=text,
            fix=f"give hub:{repo_id} (its safetensors are found) or hub:{repo_id}/FILE.gguf",
        )
    return repo_id, filename


def _from_hub(repo_id: str, revision: str | None, filename: str | None = None) -> ResolvedSource:
    from pissa.core.hub import checkpoint_files, download_checkpoint

    folder = Path(download_checkpoint(repo_id, revision, filename=filename))
    # huggingface_hub names snapshot folders by commit: record the exact commit, not just the branch.
    hub_record = {"repo_id": repo_id, "revision": revision or "main", "commit": folder.name}
    if filename is None:
        # The same choice the download made: a repo whose only weights are one .gguf file.
        present = [p.name for p in folder.iterdir() if p.is_file()]
        ggufs = [f for f in checkpoint_files(present, repo_id=repo_id) if f.endswith(".gguf")]
        filename = ggufs[0] if ggufs else None
    if filename is not None:
        gguf = materialize_gguf(folder / filename)
        record = {**hub_record, "file": filename, **gguf.record}
        return ResolvedSource(gguf.folder, "gguf", gguf.base_model, gguf.default_dtype, record)
    return ResolvedSource(folder, "hub", repo_id, record={**hub_record, "path": str(folder)})


def materialize_gguf(path: Path) -> ResolvedSource:
    """Dequantize a GGUF file into a cached float32 safetensors folder (once per file content)."""
    # Resolve the folder only: a file in a huggingface_hub snapshot is a symlink to a blob without
    # the .gguf name transformers is given.
    path = path.parent.resolve() / path.name
    digest = sha256_file(path)
    folder = cache_root() / "gguf" / digest[:16]
    record = {"path": str(path), "gguf_sha256": digest}
    # The base an exported LoRA applies to (and vLLM should serve) is the dequantized folder.
    if (folder / model_format.CONFIG).exists() and (folder / model_format.SAFETENSORS_SINGLE).exists():
        return ResolvedSource(folder, "gguf", str(folder), "bfloat16", record)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=folder.parent))
    try:
        _dequantize_gguf(path, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ResolvedSource(folder, "gguf", str(folder), "bfloat16", record)


def _dequantize_gguf(path: Path, out: Path) -> None:
    """Load ``path`` with transformers (dequantized), save config, tokenizer and fp32 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (once; cached in %s)", path.name, out.parent)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - the GGUF reader raises many types for bad files
        raise CorruptCheckpointError(f"cannot read GGUF file {path} ({exc})", path=str(path)) from exc
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and load the weights.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

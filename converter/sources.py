"""Turn a SOURCE argument (folder, ``.gguf`` file, hub id) into a local checkpoint folder.

- A folder is used as it is.
- A ``.gguf`` file is dequantized once through transformers' GGUF loader into a float32
  safetensors folder in the cache (``$PISSA_CACHE`` or ``~/.cache/pissa``), keyed by the file's
  sha256, so converting it again (other ranks, a zoo) reuses it.
- ``hub:ORG/NAME`` or ``ORG/NAME`` that is not a local path is downloaded with huggingface_hub
  (``pissa.core.hub.download_checkpoint``: revision, HF_TOKEN and HF_ENDPOINT honoured).
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
        return _from_hub(source[4:], revision)
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
        f"{source} does not exist", path=source, fix="give a model folder, a .gguf file, or hub:ORG/NAME"
    )


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not text.startswith(("/", "~"))


def _from_hub(repo_id: str, revision: str | None) -> ResolvedSource:
    from pissa.core.hub import download_checkpoint

    folder = Path(download_checkpoint(repo_id, revision))
    # huggingface_hub names snapshot folders by commit: record the exact commit, not just the branch.
    record = {"repo_id": repo_id, "revision": revision or "main", "commit": folder.name, "path": str(folder)}
    return ResolvedSource(folder, "hub", repo_id, record=record)


def materialize_gguf(path: Path) -> ResolvedSource:
    """Dequantize a GGUF file into a cached float32 safetensors folder (once per file content)."""
    path = path.resolve()
    digest = sha256_file(path)
    folder = cache_root() / "gguf" / digest[:16]
    record = {"path": str(path), "gguf_sha256": digest}
    # The base an exported LoRA applies to (and vLLM should serve) is the dequantized folder.
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
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

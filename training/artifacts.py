"""Small readers/writers shared by training and export: bundles, PEFT adapter folders, run records.

Layouts (see docs/training.md):

- a bundle has ``pissa.json`` (``format: pissa-bundle``) and ``pissa_init/`` (PEFT adapter);
- an adapter folder has ``adapter_config.json`` + ``adapter_model.safetensors``;
- every adapter ``pissa train`` writes (final adapter and checkpoints) also holds
  ``pissa_training.json``: the bundle it was trained from, the init (``pissa`` or ``lora``) and the
  sha256 of the ``pissa_init`` weights it started from, which ``pissa export`` checks against the
  bundle's own records.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.errors import CorruptCheckpointError, OutputExistsError, SourceNotFoundError
from pissa.hashing import sha256_file

BUNDLE_MANIFEST = "pissa.json"
INIT_SUBFOLDER = "pissa_init"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_RECORD = "pissa_training.json"
RUN_RECORD = "run.json"
INIT_WEIGHTS_KEY = f"{INIT_SUBFOLDER}/{ADAPTER_WEIGHTS}"


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, or raise :class:`CorruptCheckpointError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"{path} does not exist", path=str(path)) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} does not hold a JSON object", path=str(path))
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def is_bundle(path: Path) -> bool:
    return (path / BUNDLE_MANIFEST).is_file() and (path / INIT_SUBFOLDER / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class Bundle:
    """A PiSSA bundle on disk and its manifest (``pissa.json``)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def init_dir(self) -> Path:
        return self.path / INIT_SUBFOLDER

    @property
    def base_model(self) -> str | None:
        base = self.manifest.get("base_model")
        return str(base) if base else None

    @property
    def recorded_init_sha256(self) -> str | None:
        return (self.manifest.get("files") or {}).get(INIT_WEIGHTS_KEY)

    def matrices(self) -> dict[str, dict[str, Any]]:
        """Per-module records of pissa.json keyed by module name."""
        return {m["name"]: m for m in self.manifest.get("matrices") or [] if isinstance(m, dict) and "name" in m}


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle folder, or raise a one-line error saying what is missing."""
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"bundle {p} does not exist", path=str(p), fix="create it with `pissa convert`")
    if not is_bundle(p):
        raise SourceNotFoundError(
            f"{p} is not a PiSSA bundle (no {BUNDLE_MANIFEST} and {INIT_SUBFOLDER}/)",
            path=str(p),
            fix="pass a folder written by `pissa convert`",
        )
    manifest = read_json(p / BUNDLE_MANIFEST)
    if manifest.get("format") != "pissa-bundle":
        raise CorruptCheckpointError(
            f"{p / BUNDLE_MANIFEST}: format is {manifest.get('format')!r}, expected 'pissa-bundle'", path=str(p)
        )
    return Bundle(path=p.resolve(), manifest=manifest)


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def load_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapter_config, state_dict)`` of a PEFT adapter folder (safetensors only)."""
    from safetensors.torch import load_file

    if not is_adapter_dir(path):
        raise SourceNotFoundError(
            f"{path} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})", path=str(path)
        )
    config = read_json(path / ADAPTER_CONFIG)
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"{path / ADAPTER_WEIGHTS} cannot be read: {exc}", path=str(path)) from exc
    return config, tensors


def prepare_output(out: Path, *, overwrite: bool) -> Path:
    """Check ``out`` may be written and return a fresh temporary sibling folder to write into.

    Raises:
        OutputExistsError: ``out`` exists, is not empty, and ``overwrite`` is false.
    """
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (replacing an old ``out``)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_training_record(adapter_dir: Path, *, bundle: Bundle, init: str, step: int | None = None) -> None:
    """Write ``pissa_training.json`` next to an adapter trained from ``bundle``.

    Args:
        adapter_dir: the adapter folder (final adapter or a checkpoint).
        bundle: the bundle it was trained from.
        init: ``pissa`` (trained from the bundle's pissa_init) or ``lora`` (plain-LoRA baseline).
        step: optimizer step of this adapter.
    """
    write_json(
        adapter_dir / TRAINING_RECORD,
        {
            "format": "pissa-training",
            "bundle": str(bundle.path),
            "init": init,
            "pissa_init_sha256": sha256_file(bundle.init_dir / ADAPTER_WEIGHTS) if init == "pissa" else None,
            "base_model": bundle.base_model,
            "step": step,
        },
    )

"""A local Hugging Face checkpoint folder: its config, weight files, index and tensor headers.

Reading headers needs no torch: a safetensors file is ``u64 header_len`` + JSON header + data, and the
header gives every tensor's dtype, shape and byte range. We check those ranges against the file size
so a truncated shard is caught before any conversion starts, and every problem of the folder
(missing shards, keys the index names but no file holds, unreadable headers) is reported at once.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError, SourceNotFoundError, UnsupportedCheckpointError
from pissa.core.formats import bundle
from pissa.core.formats import model as model_format
from pissa.core.formats.dtypes import CODE_BYTES, FLOAT_CODES, code_of
from pissa.core.jsonio import read_json

SAFETENSORS_INDEX = model_format.SAFETENSORS_INDEX
SAFETENSORS_SINGLE = model_format.SAFETENSORS_SINGLE
BIN_INDEX = model_format.BIN_INDEX
BIN_SINGLE = model_format.BIN_SINGLE
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
# Files of the source that the bundle does not copy (we write our own model card and records).
NOT_COPIED = {bundle.CARD, bundle.RECORD, SAFETENSORS_INDEX, BIN_INDEX}



@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one tensor."""

    key: str
    file: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # absolute file offset of the data (safetensors only)

    @property
    def nbytes(self) -> int:
        n = CODE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass(frozen=True)
class Checkpoint:
    """A validated local checkpoint folder.

    Attributes:
        folder: the folder.
        config: parsed config.json.
        fmt: ``safetensors`` or ``bin``.
        weight_files: weight files in order (relative names).
        tensors: every tensor, by key, with its file and header information.
        index_metadata: the ``metadata`` of the index file (``{}`` for a single file).
        extra_files: other top-level files copied into the bundle (config, tokenizer, ...).
    """

    folder: Path
    config: dict[str, Any]
    fmt: str
    weight_files: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    index_metadata: dict[str, Any]
    extra_files: tuple[str, ...]
    file_metadata: dict[str, dict[str, str]]

    def file_bytes(self, file: str) -> int:
        return (self.folder / file).stat().st_size


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor headers and ``__metadata__`` of a safetensors file, checked against its size.

    Raises:
        CorruptCheckpointError: unreadable header, or data ranges beyond the end of the file.
    """
    size = path.stat().st_size
    fix = "re-download or re-save this file"
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptCheckpointError(f"{path} is truncated (no header)", path=str(path), fix=fix)
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise CorruptCheckpointError(
                    f"{path} is not a safetensors file (header length {header_len})", path=str(path), fix=fix
                )
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} has a corrupt header ({exc})", path=str(path), fix=fix) from exc
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for key, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            info = TensorInfo(
                key, path.name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), 8 + header_len + begin
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{path} has a corrupt header entry for {key!r}", path=str(path), fix=fix
            ) from exc
        if stop - begin != info.nbytes:
            raise CorruptCheckpointError(
                f"{path}: tensor {key!r} has {stop - begin} bytes for shape {list(info.shape)} {info.dtype}",
                path=str(path),
                fix=fix,
            )
        tensors[key] = info
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise CorruptCheckpointError(
            f"{path} is truncated ({size} bytes, header promises {8 + header_len + end})", path=str(path), fix=fix
        )
    return tensors, metadata


def open_checkpoint(folder: Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open and validate a local checkpoint folder (all problems of the weight files reported at once).

    Raises:
        SourceNotFoundError: no folder, no config.json, no weights, or files the index names are missing.
        CorruptCheckpointError: unreadable index or header, truncated shard, keys missing from shards.
        UnsupportedCheckpointError: pickle-only weights without ``allow_pickle``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceNotFoundError(f"{folder} is not a folder", path=str(folder), fix="give a checkpoint folder")
    config = read_json(folder / model_format.CONFIG, fix=f"the folder needs its {model_format.CONFIG}")

    index_metadata: dict[str, Any] = {}
    weight_map: dict[str, str] | None = None
    if (folder / SAFETENSORS_INDEX).exists() or (folder / SAFETENSORS_SINGLE).exists():
        fmt = "safetensors"
        index_name, single = SAFETENSORS_INDEX, SAFETENSORS_SINGLE
    elif (folder / BIN_INDEX).exists() or (folder / BIN_SINGLE).exists():
        fmt = "bin"
        index_name, single = BIN_INDEX, BIN_SINGLE
        if not allow_pickle:
            raise UnsupportedCheckpointError(
                f"{folder} holds only pickle weights (pytorch_model*.bin)",
                fix="pass --allow-pickle to read them with torch.load(weights_only=True), "
                "or convert them to safetensors first",
            )
    else:
        raise SourceNotFoundError(
            f"{folder} has no model.safetensors, sharded index, or pytorch_model.bin",
            path=str(folder),
            fix="point at a Hugging Face model folder with its weights",
        )
    if (folder / index_name).exists():
        index = read_json(folder / index_name, fix=f"the folder needs its {index_name}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{folder / index_name} has no weight_map", path=str(folder / index_name))
        index_metadata = dict(index.get("metadata") or {})
        weight_files = tuple(sorted(set(weight_map.values())))
    else:
        weight_files = (single,)

    missing = [f for f in weight_files if not (folder / f).is_file()]
    if missing:
        raise SourceNotFoundError(
            f"{folder}: the index names {len(missing)} missing file(s): {', '.join(missing)}",
            path=str(folder),
            fix="download the missing shards again",
        )

    tensors: dict[str, TensorInfo] = {}
    file_metadata: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for file in weight_files:
        if fmt == "safetensors":
            try:
                found, file_metadata[file] = read_safetensors_header(folder / file)
            except CorruptCheckpointError as exc:
                problems.append(exc.message)
                continue
        else:
            found = _bin_headers(folder / file)
        tensors.update(found)
    if weight_map is not None and not problems:
        absent = [k for k, f in weight_map.items() if k not in tensors or tensors[k].file != f]
        if absent:
            problems.append(
                f"{len(absent)} tensor(s) named by the index are not in the file it names, e.g. {absent[0]!r}"
            )
    if problems:
        raise CorruptCheckpointError(
            "; ".join(problems), path=str(folder), fix="re-download or re-save the damaged file(s)"
        )

    extra = tuple(
        sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.startswith(".")
        )
    )
    return Checkpoint(folder, config, fmt, weight_files, tensors, index_metadata, extra, file_metadata)


def _bin_headers(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of a pickle checkpoint, read with ``weights_only=True`` and memory-mapped."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad pickle
        raise CorruptCheckpointError(f"{path} cannot be read safely ({exc})", path=str(path)) from exc
    out = {}
    for key, t in state.items():
        code = code_of(t.dtype)
        out[key] = TensorInfo(key, path.name, code, tuple(t.shape))
    return out

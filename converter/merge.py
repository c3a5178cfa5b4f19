"""Merged weights for ``pissa export --merge``: ``W_res + s·B′A′``, streamed tensor by tensor.

The residual model of a bundle keeps the source's tensor names, dtypes and shard split, and so does
the merged model: each residual shard is walked in its header's order of names, one tensor at a
time (:func:`converter.stio.read_tensor`: its own buffer, no memory map), and written at once to
the output shard laid out up front (:class:`converter.stio.SafetensorsWriter`, which re-reads the
file, compares every tensor's CRC-32 with what it wrote and returns the file's sha256). A trained
module's weight becomes ``W_res + s·B′A′`` computed in float32 and cast back to the residual's
dtype; every other tensor is copied byte for byte. Peak memory is a few matrices, not a shard.

Maths: ``W_res + s·B₀A₀ = W`` (to the residual dtype's rounding), so ``W_res + s·B′A′ = W + ΔW``
with ``ΔW = s·(B′A′ − B₀A₀)``, the same model as (original base + exported LoRA). Conv1D layers
(GPT-2, ``fan_in_fan_out``) store ``Wᵀ``, so the product is transposed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.checkpoint import SAFETENSORS_INDEX, Checkpoint, TensorInfo
from converter.stio import SafetensorsWriter, read_tensor
from pissa.core.errors import ExportError, OutputWriteError
from pissa.core.formats.dtypes import torch_dtype
from pissa.core.jsonio import write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Factors:
    """A trained module's adapter: ``lora_A [r, in]``, ``lora_B [out, r]``, and whether W is stored transposed."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    fan_in_fan_out: bool = False

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the stored weight this adapter adds to."""
        out_f, in_f = int(self.lora_b.shape[0]), int(self.lora_a.shape[1])
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)


@dataclass(frozen=True)
class MergedLayer:
    """One merged weight: its tensor name, stored shape and ``‖s·B′A′‖_F`` (float32)."""

    key: str
    shape: tuple[int, int]
    delta_norm: float


@dataclass(frozen=True)
class MergedWeights:
    """What :func:`write_merged_weights` wrote: sha256 of every shard (from the writer's re-read), merged layers."""

    files: dict[str, str]
    layers: tuple[MergedLayer, ...]


def merged_weight(residual: torch.Tensor, factors: Factors, scaling: float) -> tuple[torch.Tensor, float]:
    """``W_res + s·B′A′`` in float32, cast to the residual's dtype, and ``‖s·B′A′‖_F``.

    Raises:
        ValueError: the product's shape is not the residual's.
    """
    delta = factors.lora_b.float() @ factors.lora_a.float()
    delta.mul_(scaling)  # in place: the same bits as ``scaling * delta``, one matrix less in memory
    if factors.fan_in_fan_out:
        delta = delta.transpose(0, 1)
    if tuple(delta.shape) != tuple(residual.shape):
        raise ValueError(f"residual {list(residual.shape)} vs adapter product {list(delta.shape)}")
    norm = float(delta.norm())
    return delta.add_(residual.float()).to(residual.dtype), norm  # float addition commutes: W_res + s·B′A′


def merge_problems(residual: Checkpoint, factors: dict[str, Factors]) -> list[str]:
    """Every reason the merge cannot run, from the headers alone (nothing is read or written)."""
    problems = []
    for key in sorted(factors):
        info = residual.tensors.get(key)
        if info is None:
            problems.append(f"{key}: no such tensor in the residual weights")
        elif info.shape != factors[key].weight_shape:
            problems.append(f"{key}: residual {list(info.shape)} vs adapter product {list(factors[key].weight_shape)}")
        elif not info.is_float:
            problems.append(f"{key}: residual dtype {info.dtype} is not a float type")
    return problems


def write_merged_weights(residual: Checkpoint, factors: dict[str, Factors], scaling: float, out: Path) -> MergedWeights:
    """Write the merged model's shards (and index, when the residual has one) into ``out``.

    Args:
        residual: the bundle's residual weights (:func:`converter.checkpoint.open_checkpoint` of it).
        factors: trained adapter of each merged weight, by tensor name.
        scaling: the adapter's ``s`` (``lora_alpha / r``, or ``/ √r`` with rsLoRA).
        out: an existing, empty folder (a temporary one: the caller renames it into place).

    Returns:
        :class:`MergedWeights`.

    Raises:
        ExportError: a weight the adapter names is missing from the residual or has another shape
            (every problem at once, before anything is written).
        OutputWriteError: a file could not be written, or did not read back as written.
    """
    problems = merge_problems(residual, factors)
    if problems:
        raise ExportError(f"cannot merge into {residual.folder}: " + "; ".join(problems[:5]),
                          fix="export with the bundle the adapter was trained from, or re-create the bundle")
    files: dict[str, str] = {}
    layers: list[MergedLayer] = []
    for name in residual.weight_files:
        infos = {info.key: info for info in residual.tensors.values() if info.file == name}
        layout = {key: (torch_dtype(info.dtype), info.shape) for key, info in infos.items()}
        metadata = residual.file_metadata.get(name) or {"format": "pt"}
        path = out / name
        try:
            with SafetensorsWriter(path, layout, metadata) as writer:
                # The writer lays tensors out in name order: writing in that order lets it hash as it goes.
                for key in sorted(infos):
                    tensor = _read(residual, infos[key])
                    if key in factors:
                        tensor, norm = merged_weight(tensor, factors[key], scaling)
                        layers.append(MergedLayer(key, (int(tensor.shape[0]), int(tensor.shape[1])), norm))
                    writer.write(key, tensor)
                    del tensor
        except OSError as exc:
            raise OutputWriteError(f"writing {path} failed: {exc.strerror or exc}",
                                   fix="free disk space or fix permissions, then export again") from exc
        assert writer.sha256 is not None
        files[name] = writer.sha256
        logger.info("merged %s (%d tensors)", name, len(infos))
    if (residual.folder / SAFETENSORS_INDEX).is_file():
        weight_map = {key: info.file for key, info in sorted(residual.tensors.items())}
        total = sum(info.nbytes for info in residual.tensors.values())
        write_json(out / SAFETENSORS_INDEX, {"metadata": {**residual.index_metadata, "total_size": total},
                                             "weight_map": weight_map})
    return MergedWeights(files=files, layers=tuple(layers))


def _read(residual: Checkpoint, info: TensorInfo) -> torch.Tensor:
    try:
        return read_tensor(residual.folder / info.file, info)
    except OSError as exc:
        raise ExportError(f"{residual.folder / info.file}: cannot read {info.key!r} ({exc})",
                          fix="re-create the bundle (or check it with `pissa verify`)") from exc

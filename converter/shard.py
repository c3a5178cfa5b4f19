"""Convert one source shard: read it, factor its targets, write its residual and adapter part.

A shard's output depends on that shard alone, so shards convert independently: in this process, in
worker processes, or on torchrun ranks. Every matrix is factored with one BLAS thread (matrices run
in parallel threads instead), so results are bit-identical whatever the number of workers, threads
or ranks. Each file is written under a temporary name, reloaded and compared with what was meant to
be written, checksummed and then renamed; the part's marker (``.parts/<shard>.json``) is written
last, so a shard is either complete or redone on ``--resume``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from converter.bundle import adapter_key
from converter.factorize import pissa_split
from converter.svd import SvdOptions
from converter.targets import Target
from pissa.errors import NonFiniteWeightError, OutputWriteError

log = logging.getLogger(__name__)

PARTS = ".parts"
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to convert one shard (picklable)."""

    source_folder: str
    source_file: str
    output_file: str
    fmt: str  # safetensors | bin
    targets: tuple[Target, ...]
    rank: int
    scaling: float
    svd: SvdOptions
    seed: int
    residual_dtype: str | None  # None: keep each tensor's dtype
    adapter_dtype: str
    device: str
    threads: int
    staging: str

    @property
    def marker(self) -> Path:
        return Path(self.staging) / PARTS / f"{self.output_file}.json"

    @property
    def adapter_part(self) -> Path:
        return Path(self.staging) / PARTS / f"{self.output_file}.adapter.safetensors"


def matrix_seed(seed: int, key: str) -> int:
    """Per-matrix sketch seed from the run seed and the tensor key (order- and process-independent)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def part_is_complete(job: ShardJob) -> bool:
    """A finished part whose files still match the checksums in its marker."""
    try:
        marker = json.loads(job.marker.read_text())
        out = Path(job.staging) / job.output_file
        return (
            sha256_file(out) == marker["output_sha256"]
            and sha256_file(job.adapter_part) == marker["adapter_sha256"]
        )
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """One BLAS/LAPACK thread per matrix (torch and scipy's OpenBLAS); restored afterwards."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def _load_state(job: ShardJob) -> tuple[Callable[[str], torch.Tensor], list[str], dict[str, str]]:
    path = Path(job.source_folder) / job.source_file
    if job.fmt == "bin":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state.__getitem__, list(state), {}
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    return handle.get_tensor, list(handle.keys()), dict(handle.metadata() or {})


def _save_checked(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    """Save under a temp name, reload and compare, fsync, rename; return the sha256."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with safe_open(str(tmp), framework="pt") as f:
            if set(f.keys()) != set(tensors):
                raise OutputWriteError(f"{path}: reloaded file has other tensors than were written")
            for key in tensors:
                if not torch.equal(f.get_tensor(key), tensors[key]):
                    raise OutputWriteError(f"{path}: tensor {key!r} differs after reloading")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        digest = sha256_file(tmp)
        tmp.replace(path)
        return digest
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(
            f"writing {path} failed: {exc.strerror or exc}", fix="free disk space or fix permissions, then --resume"
        ) from exc


def convert_shard(job: ShardJob, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert one shard; return (and write as its marker) the part record.

    Args:
        job: the shard and every option.
        progress: called with the bytes of each finished matrix (progress bars live in the driver).

    Raises:
        NonFiniteWeightError: a target holds NaN/Inf.
        OutputWriteError: writing failed.
    """
    start = time.perf_counter()
    get, keys, metadata = _load_state(job)
    metadata = {**metadata, "format": "pt"}
    res_dtype = TORCH_DTYPES[job.residual_dtype] if job.residual_dtype else None
    adapter_dtype = TORCH_DTYPES[job.adapter_dtype]
    by_key = {t.key: t for t in job.targets}
    out: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    stats: list[dict[str, Any]] = []
    source_path = str(Path(job.source_folder) / job.source_file)

    def factor(target: Target, weight: torch.Tensor) -> tuple[Target, Any, float]:
        t0 = time.perf_counter()
        if not torch.isfinite(weight).all():
            raise NonFiniteWeightError(target.key, path=source_path)
        w = weight.to(job.device)
        split = pissa_split(
            w,
            rank=job.rank,
            scaling=job.scaling,
            svd=job.svd,
            seeds=[matrix_seed(job.seed, target.key)],
            fan_in_fan_out=target.fan_in_fan_out,
            adapter_dtype=adapter_dtype,
            residual_dtype=res_dtype or weight.dtype,
        )
        return target, split, time.perf_counter() - t0

    def collect(target: Target, split: Any, seconds: float) -> None:
        out[target.key] = split.residual.cpu()
        adapter[adapter_key(target.module, "lora_A")] = split.lora_A.cpu()
        adapter[adapter_key(target.module, "lora_B")] = split.lora_B.cpu()
        out_f, in_f = target.out_in
        stats.append(
            {
                "name": target.module,
                "key": target.key,
                "shard": job.output_file,
                "shape": [out_f, in_f],
                "fan_in_fan_out": target.fan_in_fan_out,
                "energy": float(split.energy),
                "rel_error": float(split.rel_error),
                "seconds": round(seconds, 4),
            }
        )
        if progress:
            progress(out_f * in_f * 4)

    threads = max(1, job.threads) if job.device == "cpu" else 1
    ctx = single_threaded_blas() if job.device == "cpu" else contextlib.nullcontext()
    with ctx, ThreadPoolExecutor(threads) as pool:
        pending = []
        for key in keys:
            tensor = get(key)
            if key in by_key:
                pending.append(pool.submit(factor, by_key[key], tensor))
                if len(pending) >= 2 * threads:  # bound the matrices in flight
                    collect(*pending.pop(0).result())
            else:
                cast = res_dtype is not None and tensor.is_floating_point()
                out[key] = tensor.to(res_dtype) if cast else tensor
        for fut in pending:
            collect(*fut.result())

    stats.sort(key=lambda s: s["key"])
    out_path = Path(job.staging) / job.output_file
    output_sha = _save_checked(out, out_path, metadata)
    adapter_sha = _save_checked(adapter, job.adapter_part, {"format": "pt"})
    record = {
        "source_file": job.source_file,
        "source_sha256": sha256_file(Path(source_path)),
        "output_file": job.output_file,
        "output_sha256": output_sha,
        "adapter_sha256": adapter_sha,
        "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sorted(out.items())},
        "matrices": stats,
        "seconds": round(time.perf_counter() - start, 3),
    }
    tmp = job.marker.with_name(job.marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(job.marker)
    log.debug("shard %s: %d matrices in %.2fs", job.source_file, len(stats), record["seconds"])
    return record

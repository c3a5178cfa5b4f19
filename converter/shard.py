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
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from converter.checkpoint import TensorInfo
from converter.factorize import NonFiniteError, PissaSplit, pissa_split
from converter.options import QuantOptions
from converter.stio import SafetensorsWriter, read_tensor, tensor_bytes
from converter.svd import SvdOptions
from converter.targets import Target
from pissa.core.errors import NonFiniteWeightError, OutputWriteError, StoppedError
from pissa.core.formats.adapter import adapter_key
from pissa.core.formats.bundle import PARTS
from pissa.core.formats.dtypes import torch_dtype
from pissa.core.hashing import BackgroundDigests, sha256_file
from pissa.core.jsonio import read_json, write_json

log = logging.getLogger(__name__)


class StopFlag(Protocol):
    """Set when the run has failed elsewhere: a ``threading.Event`` or a ``multiprocessing`` one."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to convert one shard (picklable)."""

    source_folder: str
    source_file: str
    output_file: str
    fmt: str  # safetensors | bin
    tensors: tuple[TensorInfo, ...]  # every tensor of the shard, in file order
    metadata: tuple[tuple[str, str], ...]  # the shard's safetensors __metadata__
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
    quant: QuantOptions | None = None  # QPiSSA: fit the adapter to the NF4-quantized residual
    packed: bool = False  # QPiSSA: store Q in bitsandbytes' 4-bit layout (else deq(Q) in residual_dtype)

    @property
    def marker(self) -> Path:
        return Path(self.staging) / PARTS / f"{self.output_file}.json"

    @property
    def adapter_part(self) -> Path:
        return Path(self.staging) / PARTS / f"{self.output_file}.adapter.safetensors"


def matrix_seed(seed: int, key: str) -> int:
    """Per-matrix sketch seed from the run seed and the tensor key (order- and process-independent)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def part_is_complete(job: ShardJob) -> bool:
    """A finished part whose files still match the checksums in its marker."""
    try:
        marker = read_json(job.marker)
        out = Path(job.staging) / job.output_file
        return (
            sha256_file(out) == marker["output_sha256"]
            and sha256_file(job.adapter_part) == marker["adapter_sha256"]
        )
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def single_threaded_blas(load_scipy: bool = True) -> Iterator[None]:
    """One BLAS/LAPACK thread per matrix (torch and scipy's OpenBLAS); restored afterwards.

    threadpoolctl only limits BLAS libraries already loaded when the limit is entered, so scipy's
    OpenBLAS (used by :func:`converter.svd.exact_top_r`, which imports scipy lazily) is loaded first.
    Without that, ``--svd exact`` ran every eigensolve with all-core OpenBLAS inside each pool
    thread: oversubscribed and spinning, 10x slower (186 s instead of 18 s on SmolLM2, 2 cores).
    ``load_scipy=False`` skips that import (~0.3 s) when no matrix can reach the exact path.
    """
    if load_scipy:
        import scipy.linalg  # noqa: F401 - load scipy's BLAS before limiting it
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def _reader(job: ShardJob) -> Callable[[TensorInfo], torch.Tensor]:
    path = Path(job.source_folder) / job.source_file
    if job.fmt == "bin":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return lambda info: state[info.key].clone()
    return lambda info: read_tensor(path, info)


@contextlib.contextmanager
def _writer(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
    """A :class:`SafetensorsWriter` on a temp name, renamed to ``path`` once complete and checked."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with SafetensorsWriter(tmp, layout, metadata) as w:
            yield w
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(
            f"writing {path} failed: {exc.strerror or exc}", fix="free disk space or fix permissions, then --resume"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class FactorPool:
    """The threads that factor matrices, shared by every shard this process converts.

    ``reading`` lets one shard at a time read and submit matrices: the next shard starts reading as
    soon as the previous one has submitted its last matrix, so its final writes, ``fsync`` and
    re-read overlap the next shard's factoring instead of leaving the factoring threads idle (on
    the 4-shard synthetic model those tails were ~1 s of one idle core per run).
    """

    executor: ThreadPoolExecutor
    threads: int
    reading: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def factor_pool(threads: int, device: str = "cpu", load_scipy: bool = True) -> Iterator[FactorPool]:
    """A :class:`FactorPool` of ``threads`` threads, each with one BLAS thread (see :func:`single_threaded_blas`)."""
    threads = max(1, threads) if device == "cpu" else 1
    ctx = single_threaded_blas(load_scipy) if device == "cpu" else contextlib.nullcontext()
    # torch's intra-op thread count is per thread (OpenMP): set it in every pool thread too.
    with ctx, ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as executor:
        yield FactorPool(executor, threads)


def may_use_scipy(job: ShardJob) -> bool:
    """Whether scipy's BLAS/LAPACK can run for this shard (:func:`converter.svd.exact_top_r`, QPiSSA's nuclear norms)."""
    return (
        job.svd.method == "exact" or job.quant is not None  # QPiSSA's nuclear norms use scipy's BLAS/LAPACK
        or any(job.rank + job.svd.oversample >= min(t.out_in) for t in job.targets)
    )


def _contiguous_data_start(job: ShardJob) -> int | None:
    """Where the tensor data starts if the shard's tensors tile it exactly (header, then data, no gaps)."""
    if job.fmt != "safetensors" or not job.tensors:
        return None
    start = job.tensors[0].offset
    end = start
    for info in job.tensors:
        if info.offset != end:
            return None
        end += info.nbytes
    size = (Path(job.source_folder) / job.source_file).stat().st_size
    return start if end == size else None


class _SourceDigest:
    """The source shard's sha256 (provenance), without a second pass over the file when possible.

    Either the digest is already being computed (``known``: the driver hashes the shards it converts
    in process while torch is still being imported), or: the conversion reads every tensor of the
    shard in file order; when they tile the file, the header plus those very buffers are the whole
    file, and one background thread hashes them as they are read (hashlib releases the GIL).
    Otherwise (pickle shards, gaps) a :class:`~pissa.core.hashing.BackgroundDigests` hashes the file on its own.
    """

    def __init__(self, job: ShardJob, known: Future[str] | None = None) -> None:
        path = Path(job.source_folder) / job.source_file
        self._pool = ThreadPoolExecutor(1)
        self._own: BackgroundDigests | None = None
        start = None if known is not None else _contiguous_data_start(job)
        self._streaming = start is not None
        if known is not None:
            self._result: Future[str] | None = known
        elif start is not None:
            with open(path, "rb") as f:
                self._hash = hashlib.sha256(f.read(start))
            self._result = None
        else:
            self._own = BackgroundDigests([path])
            self._result = self._own.get(path)

    def feed(self, tensor: torch.Tensor) -> None:
        if self._streaming:
            self._pool.submit(self._hash.update, tensor_bytes(tensor))

    def hexdigest(self) -> str:
        self._pool.shutdown(wait=True)
        return self._result.result() if self._result is not None else self._hash.hexdigest()

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._own is not None:
            self._own.cancel()


def convert_shard(
    job: ShardJob,
    progress: Callable[[int], None] | None = None,
    pool: FactorPool | None = None,
    source_digest: Future[str] | None = None,
    stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Convert one shard; return (and write as its marker) the part record.

    Tensors are read one at a time and written as soon as they are computed (see
    :mod:`converter.stio`), so memory holds a few matrices, never the shard.

    Args:
        job: the shard and every option.
        progress: called with the bytes of each finished matrix (progress bars live in the driver).
        pool: factoring threads shared with other shards (default: a pool for this shard alone).
        source_digest: the source file's sha256 if something already computes it.
        stop: checked before each tensor is read; once set, the shard stops (its temporary files
            are removed, nothing is left half-written).

    Raises:
        NonFiniteWeightError: a target holds NaN/Inf.
        OutputWriteError: writing failed.
        StoppedError: ``stop`` was set.
    """
    if pool is None:
        with factor_pool(job.threads, job.device, may_use_scipy(job)) as own:
            return _convert_shard(job, progress, own, source_digest, stop)
    return _convert_shard(job, progress, pool, source_digest, stop)


@dataclass(frozen=True)
class _QuantizedSplit(PissaSplit):
    quant_record: dict[str, Any] = field(default_factory=dict)
    packed: dict[str, torch.Tensor] | None = None  # the packed layout's tensors (residual unused then)


def _quantized_split(
    job: ShardJob, target: Target, weight: torch.Tensor, adapter_dtype: torch.dtype, residual_dtype: torch.dtype
) -> _QuantizedSplit:
    """QPiSSA split of one matrix; the residual stored is ``deq(Q)`` cast to the residual dtype, or
    (``job.packed``) Q itself in bitsandbytes' 4-bit layout, which dequantizes to the float32 ``deq(Q)``.

    Recorded like a plain split, from the tensors as stored: ``energy = ‖s·BA‖² / ‖W_res + s·BA‖²`` (what
    ``pissa verify`` recomputes) and ``rel_error = ‖W − (W_res + s·BA)‖ / ‖W‖`` (now the quantization
    error); plus the nuclear errors of QPiSSA and QLoRA, their ratio and the kept iterate.
    """
    from converter.qpissa import qpissa_split

    assert job.quant is not None
    stored = weight.to(job.device)
    w = (stored.T if target.fan_in_fan_out else stored).to(torch.float32)
    q = qpissa_split(
        w, rank=job.rank, scaling=job.scaling, svd=job.svd, quant=job.quant, seed=matrix_seed(job.seed, target.key)
    )
    lora_a, lora_b = q.lora_A.to(adapter_dtype), q.lora_B.to(adapter_dtype)
    packed = None
    if job.packed:
        from converter.qpack import packed_tensors

        packed = packed_tensors(target.key, q.quantized, target.out_in, job.quant)
        residual_dtype = torch.float32
    residual = q.quantized.dequantized.to(residual_dtype)
    res, b, a, s = residual.float(), lora_b.float(), lora_a.float(), job.scaling
    if residual.dtype == adapter_dtype == torch.float32:  # stored as computed: qpissa_split measured it
        error_norm = q.error_fro
    else:  # W − (W_res + s·BA) as stored: one pass and one BLAS call (no s·BA or W_res + s·BA the size of W)
        error_norm = float(torch.linalg.vector_norm(torch.sub(w, res).addmm_(b, a, alpha=-s)))
    rel_error = error_norm / max(float(torch.linalg.vector_norm(w)), 1e-300)
    # ‖s·BA‖² = s²·Σ (BᵀB) ⊙ (AAᵀ) and ⟨W_res, s·BA⟩ = s·Σ B ⊙ (W_res Aᵀ): r-sized products, float64 sums.
    delta_sq = s * s * float(((b.T @ b).double() * (a @ a.T).double()).sum())
    cross = s * float((b.double() * (res @ a.T).double()).sum())
    recon_sq = float(torch.linalg.vector_norm(res).double()) ** 2 + 2 * cross + delta_sq
    energy = delta_sq / max(recon_sq, 1e-300)
    if target.fan_in_fan_out:
        residual = residual.T
    return _QuantizedSplit(
        lora_A=lora_a.contiguous(),
        lora_B=lora_b.contiguous(),
        residual=residual.contiguous(),
        energy=torch.tensor(energy, dtype=torch.float64),
        rel_error=torch.tensor(rel_error, dtype=torch.float64),
        quant_record={
            "qpissa_nuclear": q.error,
            "qlora_nuclear": q.qlora_error,
            "qpissa_qlora_ratio": q.ratio,
            "quant_best_iter": q.best,
            # ‖W − (W_res + s·B₀A₀)‖_F as stored: what a LoRA on the original W cannot carry (pissa export).
            "quant_error_norm": error_norm,
        },
        packed=packed,
    )


def _convert_shard(
    job: ShardJob,
    progress: Callable[[int], None] | None,
    pool: FactorPool,
    known_digest: Future[str] | None,
    stop: StopFlag | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    read = _reader(job)
    res_dtype = torch_dtype(job.residual_dtype) if job.residual_dtype else None
    adapter_dtype = torch_dtype(job.adapter_dtype)
    by_key = {t.key: t for t in job.targets}
    source_path = str(Path(job.source_folder) / job.source_file)

    def out_dtype(info: TensorInfo) -> torch.dtype:
        dtype = torch_dtype(info.dtype)
        return res_dtype if res_dtype is not None and dtype.is_floating_point else dtype

    layout = {info.key: (out_dtype(info), info.shape) for info in job.tensors}
    if job.packed:
        from converter.qpack import packed_layout

        assert job.quant is not None
        for t in job.targets:
            del layout[t.key]
            layout.update(packed_layout(t.key, t.out_in, job.quant))
    adapter_layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for t in job.targets:
        out_f, in_f = t.out_in
        adapter_layout[adapter_key(t.module, "lora_A")] = (adapter_dtype, (job.rank, in_f))
        adapter_layout[adapter_key(t.module, "lora_B")] = (adapter_dtype, (out_f, job.rank))
    stats: list[dict[str, Any]] = []

    def factor(target: Target, weight: torch.Tensor) -> tuple[Target, Any]:
        try:
            if job.quant is not None:
                return target, _quantized_split(job, target, weight, adapter_dtype, res_dtype or weight.dtype)
            split = pissa_split(
                weight.to(job.device),
                rank=job.rank,
                scaling=job.scaling,
                svd=job.svd,
                seeds=[matrix_seed(job.seed, target.key)],
                fan_in_fan_out=target.fan_in_fan_out,
                adapter_dtype=adapter_dtype,
                residual_dtype=res_dtype or weight.dtype,
            )
        except NonFiniteError:
            raise NonFiniteWeightError(target.key, path=source_path) from None
        return target, split

    out_path = Path(job.staging) / job.output_file
    metadata = {**dict(job.metadata), "format": "pt"}
    threads = pool.threads
    digest = _SourceDigest(job, known_digest)
    pending: deque[tuple[str, Any]] = deque()
    try:
        with _writer(out_path, layout, metadata) as res_w, _writer(job.adapter_part, adapter_layout, {"format": "pt"}) as ada_w:

            def collect(target: Target, split: Any) -> None:
                packed = getattr(split, "packed", None)
                for key, tensor in sorted(packed.items()) if packed else [(target.key, split.residual.cpu())]:
                    res_w.write(key, tensor)
                ada_w.write(adapter_key(target.module, "lora_A"), split.lora_A.cpu())
                ada_w.write(adapter_key(target.module, "lora_B"), split.lora_B.cpu())
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
                        **getattr(split, "quant_record", {}),
                    }
                )
                if progress:
                    progress(out_f * in_f * 4)

            # Outputs are written in source order (a copied tensor waits behind the matrices read
            # before it), so the writer sees ascending offsets and hashes the file as it goes, while
            # this thread would otherwise only wait for the factoring threads.
            def drain(limit: int) -> None:
                while pending and (len(pending) > limit or pending[0][0] == "copy" or pending[0][1].done()):
                    kind, item = pending.popleft()
                    if kind == "copy":
                        res_w.write(*item)
                    else:
                        collect(*item.result())

            with pool.reading:  # released once every matrix is submitted: the next shard may read
                for info in job.tensors:
                    if stop is not None and stop.is_set():
                        raise StoppedError(f"shard {job.source_file} stopped: the run failed elsewhere")
                    tensor = read(info)
                    digest.feed(tensor)
                    if info.key in by_key:
                        pending.append(("split", pool.executor.submit(factor, by_key[info.key], tensor)))
                    else:
                        pending.append(("copy", (info.key, tensor.to(layout[info.key][0]))))
                    drain(2 * threads - 1)  # bound the matrices in flight
            drain(0)
    except BaseException:
        digest.cancel()
        for kind, item in pending:
            if kind == "split":
                item.cancel()  # a shared pool must not keep factoring a failed shard
        raise

    stats.sort(key=lambda s: s["key"])
    record = {
        "source_file": job.source_file,
        "source_sha256": digest.hexdigest(),
        "output_file": job.output_file,
        "output_sha256": res_w.sha256,
        "adapter_sha256": ada_w.sha256,
        "tensors": {k: [str(d).removeprefix("torch."), list(shape)] for k, (d, shape) in sorted(layout.items())},
        "matrices": stats,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(job.marker, record)
    log.debug("shard %s: %d matrices in %.2fs", job.source_file, len(stats), record["seconds"])
    return record

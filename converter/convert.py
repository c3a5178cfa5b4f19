"""``pissa convert``: the driver. Plans, runs the shards (here, in workers, or on torchrun ranks),
then assembles the bundle and renames it into place.

Work happens in ``<OUT parent>/.<OUT name>.partial/``: shard outputs and their markers accumulate
there, so an interrupted run resumes with ``resume=True`` (a shard is kept only if its files still
match the checksums in its marker, and only if the options and source are those of the first run).
The finished bundle appears at OUT by one rename; OUT never holds a half-written bundle.

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), rank ``k`` converts the shards
``i`` with ``i % WORLD_SIZE == k``; rank 0 then assembles the bundle. The result is the same bundle
as a single-process run, bit for bit for the tensors (every matrix is factored with one BLAS
thread, see :mod:`converter.shard`). Each step (plan, staging, shares, assembly) ends in agreement
(:mod:`converter.ranks`): when a rank fails, the others stop their shards within a heartbeat; once
every rank has stopped writing, rank 0 removes the staging folder if the input was bad (NaN
weights, ...) and keeps it for ``--resume`` otherwise; every rank exits non-zero and only the
failing rank prints its error. A rank that dies is noticed by the others at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter.alloc import tune_allocator
from converter.card import render_model_card
from converter.checkpoint import SAFETENSORS_INDEX, Checkpoint, open_checkpoint
from converter.options import ConvertOptions
from converter.ranks import Outcome, Ranks
from converter.sources import ResolvedSource, resolve_source
from converter.targets import LeftOut, convertible_layers, peft_target_modules, select_targets
from pissa.core import __version__
from pissa.core.errors import (
    InvalidOptionsError,
    OutputExistsError,
    OutputWriteError,
    PissaError,
    StoppedError,
    TargetError,
    UnsupportedCheckpointError,
)
from pissa.core.formats import adapter as adapter_format
from pissa.core.formats import bundle as B
from pissa.core.formats import model as model_format
from pissa.core.formats import nf4
from pissa.core.formats.bundle import PARTS, STORAGE_DEQUANTIZED, STORAGE_PACKED
from pissa.core.formats.dtypes import torch_dtype
from pissa.core.hashing import BackgroundDigests, sha256_file
from pissa.core.jsonio import read_json, write_json
from pissa.core.outputs import check_not_a_file, check_not_an_input, is_nonempty_dir

if TYPE_CHECKING:
    from converter.shard import ShardJob, StopFlag

log = logging.getLogger(__name__)

PLAN = ".plan.json"


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion did (the CLI prints it as a summary table)."""

    out: Path
    matrices: int
    mean_energy: float
    min_energy: float
    max_rel_error: float
    seconds: float
    output_bytes: int
    shards_total: int
    shards_reused: int
    record: dict[str, Any] = field(repr=False, default_factory=dict)
    #: pissa.json's ``left_out`` entries: matrices no adapter was made for, and why (MoE experts, routers).
    left_out: list[dict[str, Any]] = field(default_factory=list)


def output_name(source_file: str) -> str:
    """Residual file name for a source weight file (pickle shards become safetensors)."""
    if source_file.endswith(".safetensors"):
        return source_file
    stem = source_file[: -len(".bin")] if source_file.endswith(".bin") else source_file
    return stem.replace("pytorch_model", "model") + ".safetensors"


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    check_not_a_file(out)
    if is_nonempty_dir(out) and not overwrite:
        if resume and (out / B.RECORD).exists():
            return  # already finished: resume is a no-op
        raise OutputExistsError(str(out))


@dataclass(frozen=True)
class _Plan:
    ckpt: Checkpoint
    source: ResolvedSource
    jobs: tuple[ShardJob, ...]
    targets: tuple[Any, ...]
    target_modules: list[str]
    fan_in_fan_out: bool
    residual_dtype: str | None
    fingerprint: dict[str, Any]
    left_out: tuple[LeftOut, ...] = ()
    packed: bool = False  # QPiSSA residual in bitsandbytes' 4-bit layout
    skip_modules: list[str] | None = None  # its llm_int8_skip_modules


def _plan(source: ResolvedSource, ckpt: Checkpoint, options: ConvertOptions, staging: Path, distributed: bool) -> _Plan:
    """Choose targets, check ranks and dtypes (every problem at once), and make the shard jobs."""
    from converter.factorize import lora_scaling
    from converter.shard import ShardJob
    from converter.svd import SvdOptions

    all_linear, left_out = convertible_layers(ckpt)
    targets = select_targets(all_linear, options.targets, left_out)
    problems = []
    too_small = []
    for t in targets:
        info = ckpt.tensors[t.key]
        if not info.is_float:
            problems.append(f"{t.key} has dtype {info.dtype}, not a float: dequantize the checkpoint first")
        if options.rank > min(t.out_in):
            too_small.append(t)
    if too_small:  # one line for all of them (a model has hundreds of targets)
        t = min(too_small, key=lambda x: min(x.out_in))
        others = f" and {len(too_small) - 1} other target(s)" if len(too_small) > 1 else ""
        problems.append(f"--rank {options.rank} exceeds min(out, in) = {min(t.out_in)} of {t.key} "
                        f"{list(t.out_in)}{others}")
    if problems:
        raise TargetError(
            "targets cannot be converted", problems, fix="lower --rank, or leave these layers out with --targets"
        )
    fans = {t.fan_in_fan_out for t in targets}
    if len(fans) > 1:
        raise InvalidOptionsError(
            "mixed layer orientations", ["targets mix Conv1D and Linear layers"], fix="convert them separately"
        )
    residual_dtype = options.dtype or source.default_dtype
    packed = options.quantize is not None and options.dtype is None
    if packed:
        _check_packable(targets, left_out)
    # Cores per process: shared by this process's workers and, under torchrun, by the ranks on this node.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
    threads = options.threads or max(1, (os.cpu_count() or 1) // (options.workers * local_world))
    svd = SvdOptions(
        method=options.svd, niter=options.niter, oversample=options.oversample, tol=options.svd_tol  # type: ignore[arg-type]
    )
    scaling = lora_scaling(options.lora_alpha, options.rank, options.rslora)
    jobs = tuple(
        ShardJob(
            source_folder=str(ckpt.folder),
            source_file=f,
            output_file=output_name(f),
            fmt=ckpt.fmt,
            tensors=tuple(sorted((t for t in ckpt.tensors.values() if t.file == f), key=lambda t: t.offset)),
            metadata=tuple(sorted(ckpt.file_metadata.get(f, {}).items())),
            targets=tuple(t for t in targets if t.file == f),
            rank=options.rank,
            scaling=scaling,
            svd=svd,
            seed=options.seed,
            residual_dtype=residual_dtype,
            adapter_dtype=options.adapter_dtype,
            device=options.device,
            threads=threads,
            staging=str(staging),
            quant=options.quant_options(),
            packed=packed,
        )
        for f in ckpt.weight_files
    )
    fingerprint = {
        "options": options.content_record(),
        "source": {f: [ckpt.file_bytes(f), int((ckpt.folder / f).stat().st_mtime)] for f in ckpt.weight_files},
    }
    skip = _unquantized_modules(ckpt, targets, all_linear) if packed else None
    return _Plan(
        ckpt, source, jobs, tuple(targets), peft_target_modules(targets, all_linear),
        fans.pop(), residual_dtype, fingerprint, tuple(left_out), packed, skip,
    )


def _check_packable(targets: list[Any], left_out: list[Any]) -> None:
    """The packed 4-bit residual needs plain ``nn.Linear`` targets (what transformers quantizes on loading)."""
    problems = []
    if any(t.fan_in_fan_out for t in targets):
        problems.append("the targets are Conv1D layers (GPT-2 style), which the packed 4-bit layout does not cover")
    if left_out:
        problems.append("the model has MoE experts or routers, which the packed 4-bit layout does not cover")
    if problems:
        raise InvalidOptionsError(
            "cannot store this residual packed in 4 bits", problems,
            fix="pass --residual-dtype bfloat16 to store deq(Q) in a float dtype instead",
        )


def _unquantized_modules(ckpt: Checkpoint, targets: list[Any], all_linear: list[Any]) -> list[str] | None:
    """``llm_int8_skip_modules``: the Linear layers left unquantized (None: only the output embeddings).

    transformers quantizes every ``nn.Linear`` but these on loading; with a list it no longer adds the
    output embeddings itself, so ``lm_head`` and every other non-target 2-D weight are named too.
    """
    chosen = {t.key for t in targets}
    if all(t.key in chosen for t in all_linear):
        return None
    prefixes = {t.key[: -len(".weight")]: t.module for t in all_linear}
    skip = {prefixes.get(k[: -len(".weight")], k[: -len(".weight")])
            for k, info in ckpt.tensors.items()
            if k.endswith(".weight") and len(info.shape) == 2 and k not in chosen}
    return sorted(skip | {"lm_head"})


def _env_rank(distributed: bool) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not distributed:
        return 0, 1
    return int(os.environ.get("RANK", "0")), world


def _prepare_staging(staging: Path, plan: _Plan, resume: bool) -> None:
    if staging.exists() and resume:
        try:
            previous = read_json(staging / PLAN)
        except (OSError, ValueError):
            previous = None
        if previous != plan.fingerprint:
            log.warning("partial work in %s was made with other options or source: starting over", staging)
            shutil.rmtree(staging)
    elif staging.exists():
        shutil.rmtree(staging)
    (staging / PARTS).mkdir(parents=True, exist_ok=True)
    write_json(staging / PLAN, plan.fingerprint)


def _job_bytes(job: ShardJob) -> int:
    """The progress weight of a shard: float32 bytes of its target matrices."""
    return sum(t.out_in[0] * t.out_in[1] * 4 for t in job.targets)


def convert_jobs(
    jobs: list[ShardJob],
    progress: Callable[[int], None] | None = None,
    digests: BackgroundDigests | None = None,
    stop: StopFlag | None = None,
) -> None:
    """Convert ``jobs`` in this process: one pool of factoring threads, two shards in flight.

    One shard reads and submits matrices while the one before it finishes (last writes, ``fsync``,
    re-read); see :class:`converter.shard.FactorPool`. Every shard's files depend on that shard
    alone, so the order in which they finish does not matter. ``digests``: source checksums
    already being computed (see :func:`convert`). ``stop``: set by whoever learns that the run
    failed elsewhere; it is also set here when a shard fails, so the shard in flight beside it
    stops too. Returns (or raises) only once no shard is being written any more.

    Raises:
        the first failing shard's error (:class:`StoppedError` only if every shard just stopped).
    """
    if not jobs:
        return
    import torch

    from converter.shard import convert_shard, factor_pool, may_use_scipy

    def known(job: ShardJob) -> Any:
        return digests.get(Path(job.source_folder) / job.source_file) if digests else None

    flag: StopFlag = stop if stop is not None else threading.Event()

    def lane(job: ShardJob) -> None:
        try:
            convert_shard(job, progress, pool, known(job), flag)
        except BaseException:
            flag.set()  # the run has failed: the other shard in flight stops too
            raise

    load_scipy = any(may_use_scipy(j) for j in jobs)
    with factor_pool(jobs[0].threads, jobs[0].device, load_scipy) as pool:
        if len(jobs) == 1:
            convert_shard(jobs[0], progress, pool, known(jobs[0]), flag)
            return
        lanes = ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,))
        futures = []
        try:
            futures = [lanes.submit(lane, job) for job in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            flag.set()
            raise
        finally:
            lanes.shutdown(wait=True, cancel_futures=True)
    _raise_first_error(futures)


def _errors(futures: list[Future[Any]]) -> list[BaseException]:
    """The errors of the finished ``futures``, in order, those that only stopped last."""
    errors = [e for f in futures if f.done() and not f.cancelled() and (e := f.exception()) is not None]
    return sorted(errors, key=lambda e: isinstance(e, StoppedError))


def _raise_first_error(futures: list[Future[Any]]) -> None:
    """Re-raise the first real error among ``futures`` (one that only stopped if there is no other)."""
    errors = _errors(futures)
    if errors:
        raise errors[0]


# Workers are forked where fork exists: a forked worker starts in milliseconds with torch already
# imported, where a spawned one re-imports it (~1 s of CPU per worker, which made --workers 2 slower
# than one process on 2 cores). The fork happens before this process has run any torch operation
# or started a thread of its own (see _run_jobs), the case in which fork is safe with torch/OpenMP.
WORKER_CONTEXT = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _worker_init(progress_queue: Any, stop: Any = None) -> None:
    """Initializer of the converter's worker processes."""
    global _PROGRESS_QUEUE, _STOP
    tune_allocator()
    _PROGRESS_QUEUE = progress_queue
    _STOP = stop


_PROGRESS_QUEUE: Any = None
_STOP: Any = None  # a multiprocessing Event shared with the driver: the run failed elsewhere


def _convert_in_worker(jobs: list[ShardJob]) -> None:
    convert_jobs(jobs, _PROGRESS_QUEUE.put if _PROGRESS_QUEUE is not None else None, stop=_STOP)


def split_jobs(jobs: list[ShardJob], parts: int) -> list[list[ShardJob]]:
    """Share shards among ``parts`` processes: largest first, each to the least loaded (LPT)."""
    shares: list[list[ShardJob]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for job in sorted(jobs, key=lambda j: (-_job_bytes(j), j.source_file)):
        k = loads.index(min(loads))
        shares[k].append(job)
        loads[k] += _job_bytes(job) + 1
    return [sorted(s, key=lambda j: j.source_file) for s in shares if s]


def _run_jobs(
    jobs: list[ShardJob],
    workers: int,
    show_progress: bool,
    digests: BackgroundDigests | None,
    stop: StopFlag | None = None,
) -> None:
    """Convert ``jobs`` here, or spread over ``workers`` processes (this one included), with one progress bar.

    ``stop`` (set from another thread when the run failed elsewhere) stops every process's shards;
    a failing process stops the others too. Returns or raises once no process writes any more.
    """
    from tqdm.auto import tqdm

    total = sum(_job_bytes(j) for j in jobs)

    def progress_bar() -> Any:
        return tqdm(total=total, unit="B", unit_scale=True, desc="factoring", disable=not show_progress or total == 0)

    if workers <= 1 or len(jobs) <= 1:
        with progress_bar() as bar:
            convert_jobs(jobs, bar.update, digests, stop)
        return
    mine, *theirs = split_jobs(jobs, workers)
    queue = WORKER_CONTEXT.SimpleQueue()
    failed = WORKER_CONTEXT.Event()  # shared with the workers: any process failing stops them all
    # The workers fork here, before this process starts any thread of its own (progress bar and
    # relay, shard lanes, factoring pool; under torchrun the heartbeat of converter.ranks runs
    # already); then they convert their shares while this process converts its own.
    with ProcessPoolExecutor(
        len(theirs), mp_context=WORKER_CONTEXT, initializer=_worker_init, initargs=(queue, failed)
    ) as pool:
        futures = [pool.submit(_convert_in_worker, share) for share in theirs]

        def stop_all(fut: Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                failed.set()

        for fut in futures:
            fut.add_done_callback(stop_all)
        done = threading.Event()
        with progress_bar() as bar:

            def relay() -> None:  # workers' progress -> the bar; a stop from outside -> the workers
                while not done.is_set() or not queue.empty():
                    if stop is not None and stop.is_set():
                        failed.set()
                    if queue.empty():
                        time.sleep(0.05)
                        continue
                    bar.update(queue.get())

            relay_thread = threading.Thread(target=relay, daemon=True)
            relay_thread.start()
            try:
                try:
                    convert_jobs(mine, bar.update, stop=failed)
                finally:
                    wait(futures)  # every worker has stopped writing (``failed`` stops them early)
            except BaseException as exc:
                failed.set()
                for fut in futures:
                    fut.cancel()
                real = [e for e in _errors(futures) if not isinstance(e, StoppedError)]
                if isinstance(exc, StoppedError) and real:
                    raise real[0] from None  # this process only stopped because a worker failed
                raise
            finally:
                done.set()
                relay_thread.join()
            _raise_first_error(futures)


def _finalize(plan: _Plan, options: ConvertOptions, staging: Path, out: Path, started: float) -> dict[str, Any]:
    """Assemble adapter, index, copied files, card and pissa.json in staging."""
    import torch
    from safetensors import safe_open

    from converter.factorize import lora_scaling
    from converter.shard import _writer

    ckpt = plan.ckpt
    parts = [read_json(j.marker) for j in plan.jobs]
    adapter_dir = staging / B.INIT_DIR
    adapter_dir.mkdir(exist_ok=True)
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    handles = []
    for job in plan.jobs:
        handle = safe_open(str(job.adapter_part), framework="pt")
        handles.append(handle)
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            sl = handle.get_slice(key)
            layout[key] = (torch_dtype(options.adapter_dtype), tuple(sl.get_shape()))
    with _writer(adapter_dir / adapter_format.WEIGHTS, layout, {"format": "pt"}) as w:
        for handle in handles:
            for key in handle.keys():  # noqa: SIM118
                w.write(key, handle.get_tensor(key))
    write_json(
        adapter_dir / adapter_format.CONFIG,
        adapter_format.lora_config(
            rank=options.rank,
            alpha=options.lora_alpha,
            rslora=options.rslora,
            target_modules=plan.target_modules,
            fan_in_fan_out=plan.fan_in_fan_out,
            base_model_name_or_path=None,
        ),
    )

    # The index keeps the source's split; file names change only for pickle sources.
    if len(plan.jobs) > 1 or (ckpt.folder / SAFETENSORS_INDEX).exists():
        weight_map = {}
        total = 0
        for part in parts:
            for key, (dtype, shape) in part["tensors"].items():
                weight_map[key] = part["output_file"]
                n = torch.empty((), dtype=getattr(torch, dtype)).element_size()
                for d in shape:
                    n *= d
                total += n
        metadata = {**ckpt.index_metadata, "total_size": total}
        write_json(staging / SAFETENSORS_INDEX, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})

    for name in ckpt.extra_files:
        if name == model_format.CONFIG and (plan.residual_dtype or plan.packed):
            config = dict(ckpt.config)
            dtype_key = "torch_dtype" if "torch_dtype" in config else "dtype"
            if plan.residual_dtype:
                config[dtype_key] = plan.residual_dtype
            config.pop("quantization_config", None)
            quant = options.quant_options()
            if plan.packed and quant is not None:
                compute = str(config.get(dtype_key) or "float32")
                config["quantization_config"] = nf4.quantization_config(
                    quant.quant_type, quant.double_quant, compute, plan.skip_modules
                )
            write_json(staging / name, config)
        else:
            shutil.copyfile(ckpt.folder / name, staging / name)

    matrices = sorted((m for p in parts for m in p["matrices"]), key=lambda m: m["key"])
    source_files = {p["source_file"]: p["source_sha256"] for p in parts}
    source_files.update({name: sha256_file(ckpt.folder / name) for name in ckpt.extra_files})
    if (ckpt.folder / SAFETENSORS_INDEX).is_file():
        source_files[SAFETENSORS_INDEX] = sha256_file(ckpt.folder / SAFETENSORS_INDEX)
    record: dict[str, Any] = {
        "format": B.FORMAT,
        "format_version": B.FORMAT_VERSION,
        "tool": {"name": "pissa-pipeline", "version": __version__, "torch": torch.__version__},
        "base_model": plan.source.base_model,
        "source": {"kind": plan.source.kind, **plan.source.record, "files": dict(sorted(source_files.items()))},
        "license": _source_license(ckpt.folder),
        "options": options.to_record(),
        "residual_dtype": plan.residual_dtype,
        "adapter": {
            "path": B.INIT_DIR,
            "r": options.rank,
            "lora_alpha": options.lora_alpha,
            "use_rslora": options.rslora,
            "scaling": lora_scaling(options.lora_alpha, options.rank, options.rslora),
            "target_modules": plan.target_modules,
            "fan_in_fan_out": plan.fan_in_fan_out,
            "dtype": options.adapter_dtype,
        },
        "matrices": matrices,
        **_quantization_record(options, plan.residual_dtype, matrices, plan.packed),
        B.LEFT_OUT_KEY: [lo.to_record() for lo in plan.left_out],
    }
    (staging / B.CARD).write_text(render_model_card(record))
    files = {}
    # Residual shards were hashed when their writer re-read them (part markers): not again.
    known = {p["output_file"]: p["output_sha256"] for p in parts}
    for path in sorted(staging.rglob("*")):
        rel = path.relative_to(staging).as_posix()
        if path.is_file() and not rel.startswith((PARTS, PLAN)) and rel != B.RECORD:
            files[rel] = known.get(rel) or sha256_file(path)
    record["files"] = files
    record["timings"] = {
        "total_seconds": round(time.perf_counter() - started, 3),
        "shard_seconds": {p["source_file"]: p["seconds"] for p in parts},
        "execution": {"workers": options.workers, "threads": options.threads, "device": options.device},
    }
    write_json(staging / B.RECORD, record)
    return record


def _quantization_record(
    options: ConvertOptions, residual_dtype: str | None, matrices: list[dict], packed: bool
) -> dict[str, Any]:
    """pissa.json's ``quantization`` entry of a QPiSSA bundle (nothing for a plain one)."""
    quant = options.quant_options()
    if quant is None:
        return {}
    qpissa = sum(m["qpissa_nuclear"] for m in matrices)
    qlora = sum(m["qlora_nuclear"] for m in matrices)
    return {
        "quantization": {
            "quant_type": quant.quant_type,
            "blocksize": quant.blocksize,
            "iters": quant.iters,
            "double_quant": quant.double_quant,
            # packed: Q in bitsandbytes' 4-bit layout (pissa/core/formats/nf4.py), loaded by transformers with
            # the quantization_config of config.json; dequantized: deq(Q) in residual_dtype, a float model.
            "storage": STORAGE_PACKED if packed else STORAGE_DEQUANTIZED,
            "residual_dtype": None if packed else residual_dtype,
            "qpissa_nuclear_total": qpissa,
            "qlora_nuclear_total": qlora,
            "below_qlora": 1 - qpissa / qlora if qlora > 0 else 0.0,
        }
    }


def _source_license(folder: Path) -> str | None:
    """``license`` from the source's model card YAML header, if any."""
    card = folder / B.CARD
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _install(staging: Path, out: Path) -> None:
    """Move the finished bundle into place in one rename (replacing OUT when overwriting)."""
    shutil.rmtree(staging / PARTS, ignore_errors=True)
    (staging / PLAN).unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def report_from_record(out: Path, record: dict[str, Any], shards_reused: int = 0) -> ConvertReport:
    matrices = record["matrices"]
    energies = [m["energy"] for m in matrices] or [float("nan")]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ConvertReport(
        out=out,
        matrices=len(matrices),
        mean_energy=statistics.fmean(energies),
        min_energy=min(energies),
        max_rel_error=max((m["rel_error"] for m in matrices), default=0.0),
        seconds=record.get("timings", {}).get("total_seconds", 0.0),
        output_bytes=size,
        shards_total=len(record.get("timings", {}).get("shard_seconds", {})),
        shards_reused=shards_reused,
        record=record,
        left_out=list(record.get(B.LEFT_OUT_KEY) or []),
    )


def convert(
    source: str | Path,
    out: str | Path,
    options: ConvertOptions | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    distributed: bool = True,
) -> ConvertReport:
    """Convert ``source`` into a PiSSA bundle at ``out``.

    Args:
        source: a local model folder, a ``.gguf`` file, or a hub id (``hub:ORG/NAME`` or ``ORG/NAME``).
        out: the bundle folder to create.
        options: rank, targets, SVD, dtypes, parallelism (:class:`ConvertOptions`).
        overwrite: replace a non-empty ``out``.
        resume: continue an interrupted conversion of the same source with the same options.
        progress: show a progress bar.
        distributed: under torchrun (``WORLD_SIZE`` > 1), split the shards across the ranks; every
            rank must then call ``convert`` with the same arguments. ``False`` converts in this
            process alone (e.g. a zoo whose ranks split the models instead).

    Returns:
        A :class:`ConvertReport` (also readable later from ``out/pissa.json``).

    Raises:
        InvalidOptionsError, OutputExistsError, SourceNotFoundError, CorruptCheckpointError,
        UnsupportedCheckpointError, TargetError, NonFiniteWeightError, OutputWriteError,
        MissingDependencyError (``--quantize`` without bitsandbytes).
    """
    started = time.perf_counter()
    options = (options or ConvertOptions()).validate()
    out = Path(out).expanduser().absolute()
    staging = staging_path(out)
    # Under torchrun every step below ends in agreement (converter.ranks): when one rank fails,
    # the others stop within a heartbeat instead of waiting at a barrier.
    ranks = Ranks.join(distributed)
    prepared = ranks.step(lambda stop: _prepare(source, out, options, overwrite, resume, distributed))
    if isinstance(prepared, ConvertReport):  # already complete (--resume)
        ranks.close()
        return prepared
    plan, digests = prepared
    rank, world = ranks.rank, ranks.world

    def prepare_staging(stop: threading.Event) -> None:
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            _prepare_staging(staging, plan, resume)

    ranks.step(prepare_staging, cleanup=lambda outcome: digests.cancel() if digests else None)

    def convert_share(stop: threading.Event) -> int:
        from converter.shard import part_is_complete

        mine = [j for i, j in enumerate(plan.jobs) if i % world == rank]
        todo = [j for j in mine if not (resume and part_is_complete(j))]
        if len(mine) > len(todo):
            log.info("resuming: %d of %d shard(s) already converted", len(mine) - len(todo), len(mine))
        try:
            _run_jobs(todo, options.workers, progress and rank == 0, digests, stop)
        except BaseException:
            if digests:
                digests.cancel()
            raise
        return len(mine) - len(todo)

    def clean_up(outcome: Outcome) -> None:
        # Every rank has stopped writing. Bad input (e.g. NaN weights): resuming cannot help, leave
        # nothing behind. A write failure, a stop, a crash: partial work stays for --resume.
        if rank == 0 and any(_is_bad_input(f.kind) for f in outcome.failures):
            shutil.rmtree(staging, ignore_errors=True)

    reused = ranks.step(convert_share, cleanup=clean_up)

    def assemble(stop: threading.Event) -> dict[str, Any] | None:
        if rank != 0:
            return None
        record = _finalize(plan, options, staging, out, started)
        _install(staging, out)
        return record

    record = ranks.step(assemble) or B.read_record(out)
    ranks.close()
    return report_from_record(out, record, shards_reused=reused)


def _is_bad_input(kind: type[BaseException]) -> bool:
    """Errors that another run on the same input would meet again (no partial work is worth keeping)."""
    return issubclass(kind, PissaError) and not issubclass(kind, (OutputWriteError, StoppedError))


def _prepare(
    source: str | Path, out: Path, options: ConvertOptions, overwrite: bool, resume: bool, distributed: bool
) -> ConvertReport | tuple[_Plan, BackgroundDigests | None]:
    """Check OUT, open the source and plan the shards; or the report of an already complete OUT (--resume)."""
    _check_out(out, overwrite, resume)
    check_not_an_input(out, [source])
    if options.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidOptionsError("invalid convert options", [
                f"--device cuda: no CUDA device is available (torch {torch.__version__})"], fix="use --device cpu")
    if options.quantize is not None:
        from converter.qpissa import check_bitsandbytes

        check_bitsandbytes()  # before any source is read or anything written (without importing it: ~4 s)
    if resume and (out / B.RECORD).exists() and not overwrite:
        record = B.read_record(out)
        changes = options.content_changes(record.get("options") or {})
        if changes:
            raise InvalidOptionsError(f"{out} is a finished bundle made with other options",
                                      [f"--resume: {c}" for c in changes],
                                      fix="resume with the options it was made with (pissa.json's options), or pass "
                                          "--overwrite (without --resume) to convert it again with these")
        log.info("%s is already complete", out)
        return report_from_record(out, record, shards_reused=-1)
    source_resolved = resolve_source(str(source), revision=options.revision)
    if B.is_bundle(source_resolved.folder):
        raise UnsupportedCheckpointError(
            f"{source} is a PiSSA bundle: its weights are the residual W − s·BA, not the model",
            fix="convert the original model (pissa.json's source names it)")
    ckpt = open_checkpoint(source_resolved.folder, allow_pickle=options.allow_pickle)
    digests = None
    if options.workers <= 1 and not resume:
        # Hash this process's source shards now, on the other core, while torch is imported and the
        # plan is made (~1 s of one idle core otherwise); the shards then only wait for the result.
        env_rank, env_world = _env_rank(distributed)
        digests = BackgroundDigests([ckpt.folder / f for i, f in enumerate(ckpt.weight_files) if i % env_world == env_rank])
    try:
        plan = _plan(source_resolved, ckpt, options, staging_path(out), distributed)
    except BaseException:
        if digests:
            digests.cancel()
        raise
    return plan, digests

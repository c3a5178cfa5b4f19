"""``pissa export``: a trained PiSSA adapter → a standard LoRA adapter (or merged model) for the original base.

Driver only: it finds the trained adapter and its bundle, checks that they belong together, calls the
maths of :mod:`converter.export_math` layer by layer, writes the result into a temporary folder,
reloads and compares what it wrote, and renames it into place.

Exactness: the residual model satisfies ``W_res + s·B₀A₀ = W`` (to the residual dtype's rounding), so
the fine-tuned model ``W_res + s·B′A′`` equals ``W + ΔW`` with ``ΔW = s·(B′A′ − B₀A₀)``. The exact
export writes ΔW as a rank-2r LoRA; ``--rank K`` writes its best rank-K approximation and records
each layer's relative error; ``--merge`` writes ``W_res + s·B′A′`` as full weights in the bundle's (=
the source's) tensor names, dtypes and shard layout.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.checkpoint import open_checkpoint
from converter.export_math import (
    VLLM_LORA_RANKS,
    delta_svd,
    exact_delta_factors,
    exported_alpha,
    pick_auto_rank,
    truncate_delta,
)
from converter.merge import Factors, write_merged_weights
from converter.options import EXPORT_TOL
from pissa.core.errors import (
    AdapterMismatchError,
    CorruptCheckpointError,
    ExportError,
    InvalidOptionsError,
    SourceNotFoundError,
)
from pissa.core.formats import model as model_format
from pissa.core.formats import run as run_format
from pissa.core.formats.adapter import CONFIG as ADAPTER_CONFIG
from pissa.core.formats.adapter import WEIGHTS as ADAPTER_WEIGHTS
from pissa.core.formats.adapter import is_adapter_dir, load_adapter, lora_scaling, split_adapter_key
from pissa.core.formats.bundle import Bundle, is_bundle, open_bundle
from pissa.core.formats.export import RECORD as EXPORT_RECORD
from pissa.core.hashing import sha256_file
from pissa.core.jsonio import read_json, write_json
from pissa.core.outputs import check_not_an_input, move_into_place, prepare_output

logger = logging.getLogger(__name__)

# Config keys that vLLM refuses or that make no sense for an adapter on the original base.
_DROPPED_CONFIG_KEYS = ("modules_to_save", "layers_to_transform", "layers_pattern", "megatron_config")


@dataclass(frozen=True)
class LayerError:
    """Relative Frobenius error ``‖ΔW − ΔW_K‖ / ‖ΔW‖`` of one exported layer (0 for exact exports)."""

    name: str
    shape: tuple[int, int]
    rel_error: float
    delta_norm: float | None
    # QPiSSA runs: ‖deq(Q) + s·B₀A₀ − W‖ / ‖ΔW‖, what this LoRA on the original W does not carry.
    quant_gap: float | None = None


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote.

    Attributes:
        out: the folder written.
        mode: ``exact`` (rank 2r), ``compressed`` (``--rank K`` / ``auto``) or ``merged``.
        rank: rank of the exported adapter (``None`` when merged).
        lora_alpha: alpha of the exported adapter (``None`` when merged).
        base_model: the original base named in the adapter config.
        max_rel_error: worst layer's relative error of ΔW.
        layers: per-layer errors.
        candidates: for ``--rank auto``: worst-layer error of every vLLM rank tried.
        max_lora_rank: smallest vLLM ``--max-lora-rank`` that serves this adapter.
        seconds: wall time.
    """

    out: Path
    mode: str
    rank: int | None
    lora_alpha: float | None
    base_model: str | None
    max_rel_error: float
    layers: tuple[LayerError, ...]
    candidates: dict[int, float] = field(default_factory=dict)
    max_lora_rank: int | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class TrainedAdapter:
    """A trained adapter folder, its bundle, and the record ``pissa train`` left next to it."""

    path: Path
    bundle: Bundle
    record: dict[str, Any] | None


def _find_record(adapter: Path) -> dict[str, Any] | None:
    if (adapter / run_format.TRAINING_RECORD).is_file():
        return read_json(adapter / run_format.TRAINING_RECORD)
    return None


def resolve_trained_adapter(source: str | os.PathLike[str], bundle: str | os.PathLike[str] | None = None) -> TrainedAdapter:
    """Find the adapter and its bundle from a RUN folder, a checkpoint or an adapter folder.

    Args:
        source: a run folder of ``pissa train`` (its ``adapter/`` is used), one of its checkpoints,
            or any PEFT adapter folder.
        bundle: the bundle the adapter was trained from; default: the one recorded by ``pissa train``.

    Raises:
        ExportError: no adapter, no bundle to check against, or a plain-LoRA baseline run.
    """
    src = Path(source)
    if not src.exists():
        raise ExportError(f"{src} does not exist", fix="pass a run folder of `pissa train` or an adapter folder")
    adapter = src
    if not is_adapter_dir(src) and run_format.is_run(src):
        adapter = src / run_format.ADAPTER_DIR
    if not is_adapter_dir(adapter):
        raise ExportError(
            f"{src} holds no trained adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})",
            fix="pass a finished run folder, one of its checkpoint-N folders, or an adapter folder",
        )
    record = _find_record(adapter)
    if record is not None and record.get("init") in ("lora", "qlora"):
        raise ExportError(
            f"{adapter} is a plain-LoRA baseline (trained with --init {record.get('init')}): it already is an "
            "adapter for the original base",
            fix=f"use {adapter} as it is",
        )
    bundle_path: Path | None = Path(bundle) if bundle is not None else None
    if bundle_path is None and record is not None and record.get("bundle"):
        bundle_path = Path(record["bundle"])
    if bundle_path is None:
        base = read_json(adapter / ADAPTER_CONFIG).get("base_model_name_or_path")
        if base and is_bundle(Path(base)):
            bundle_path = Path(base)
    if bundle_path is None or not is_bundle(bundle_path):
        where = f" ({bundle_path} is not a bundle)" if bundle_path is not None else ""
        raise ExportError(
            f"{adapter} is not an adapter trained from a PiSSA bundle{where}",
            fix="export adapters written by `pissa train`, or name their bundle with --bundle",
        )
    return TrainedAdapter(path=adapter, bundle=open_bundle(bundle_path), record=record)


def _module_name(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` → ``(<module>, 'lora_A')``."""
    split = split_adapter_key(key)
    if split is None or split[1] not in ("lora_A", "lora_B"):
        raise ExportError(f"unexpected adapter tensor {key!r}", fix="export LoRA adapters (lora_A/lora_B only)")
    return split


def _pairs(tensors: dict[str, Any], what: str) -> dict[str, dict[str, Any]]:
    """Group ``{key: tensor}`` into ``{module: {"lora_A": .., "lora_B": .., "keys": {..}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        module, part = _module_name(key)
        entry = out.setdefault(module, {"keys": {}})
        entry[part] = value
        entry["keys"][part] = key
    broken = [m for m, e in out.items() if "lora_A" not in e or "lora_B" not in e]
    if broken:
        raise ExportError(f"{what}: modules without both lora_A and lora_B: {', '.join(sorted(broken))}")
    return out


SHAPE_PROBLEMS_LISTED = 5  # more shape mismatches than this are counted, not listed


def check_compatible(trained: TrainedAdapter) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Load the trained and initial adapters and check they belong together (every problem at once).

    Checks: the bundle's ``pissa_init`` weights still match their sha256 in pissa.json; the adapter was
    trained from exactly those weights (sha256 in its ``pissa_training.json``); same modules, same
    shapes, same r / alpha / rsLoRA; shapes agree with pissa.json's matrix records.

    Returns:
        ``(trained_config, trained_pairs, init_pairs)``.

    Raises:
        AdapterMismatchError: listing every problem found.
    """
    bundle = trained.bundle
    problems: list[str] = []
    init_file = bundle.init_dir / ADAPTER_WEIGHTS
    actual_init_sha = sha256_file(init_file)
    recorded = bundle.recorded_init_sha256
    if recorded is None:
        problems.append(f"{bundle.path}/pissa.json records no sha256 for pissa_init/{ADAPTER_WEIGHTS}")
    elif recorded != actual_init_sha:
        problems.append(f"{init_file} changed since conversion (sha256 differs from pissa.json)")
    if trained.record is not None:
        started = trained.record.get("pissa_init_sha256")
        if started != actual_init_sha:
            problems.append(
                f"{trained.path} was trained from a different pissa_init (sha256 {str(started)[:12]}… vs the "
                f"bundle's {actual_init_sha[:12]}…)"
            )
    else:
        logger.warning("%s has no %s: cannot check which init it was trained from", trained.path, run_format.TRAINING_RECORD)

    config, tensors = load_adapter(trained.path)
    init_config, init_tensors = load_adapter(bundle.init_dir)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"{trained.path}: peft_type is {config.get('peft_type')!r}, only LORA can be exported")
    if config.get("use_dora"):
        problems.append(f"{trained.path}: DoRA adapters cannot be exported as plain LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append(f"{trained.path}: rank_pattern/alpha_pattern are not supported")
    for key in ("r", "lora_alpha", "use_rslora"):
        if config.get(key) != init_config.get(key):
            problems.append(f"{key} differs: trained {config.get(key)!r}, bundle's pissa_init {init_config.get(key)!r}")
    try:
        pairs = _pairs(tensors, str(trained.path))
        init_pairs = _pairs(init_tensors, str(bundle.init_dir))
    except ExportError as exc:
        raise ExportError(exc.message, fix="the adapter is damaged; re-run `pissa train`") from exc
    missing = sorted(set(init_pairs) - set(pairs))
    extra = sorted(set(pairs) - set(init_pairs))
    if missing:
        problems.append(f"modules of pissa_init missing from the trained adapter: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"trained modules not in pissa_init: {', '.join(extra[:5])}")
    records = bundle.matrices()
    shape_problems: list[str] = []  # one per tensor: listed when a few, counted when many (a wrong bundle)
    for module in sorted(set(pairs) & set(init_pairs)):
        for part in ("lora_A", "lora_B"):
            got, want = tuple(pairs[module][part].shape), tuple(init_pairs[module][part].shape)
            if got != want:
                shape_problems.append(f"{module}.{part}: trained shape {list(got)} != initial shape {list(want)}")
        rec = records.get(module)
        if rec is not None and "shape" in rec:
            out_f, in_f = (int(x) for x in rec["shape"])
            a_in, b_out = pairs[module]["lora_A"].shape[1], pairs[module]["lora_B"].shape[0]
            if (b_out, a_in) != (out_f, in_f):
                shape_problems.append(f"{module}: adapter is [{b_out}, {a_in}], pissa.json records [{out_f}, {in_f}]")
    if len(shape_problems) > SHAPE_PROBLEMS_LISTED:
        shape_problems = [*shape_problems[:2], f"… and {len(shape_problems) - 2} more shapes that differ"]
    problems += shape_problems
    if problems:
        raise AdapterMismatchError(
            f"{trained.path} does not match the bundle {bundle.path}", problems,
            fix="export the adapter with the bundle it was trained from",
        )
    return config, pairs, init_pairs


def _exported_config(config: dict[str, Any], *, rank: int, alpha: float, use_rslora: bool, base: str | None) -> dict[str, Any]:
    """The trained config turned into a plain LoRA config for the original base (vLLM's rules)."""
    out = dict(config)
    for key in _DROPPED_CONFIG_KEYS:
        out.pop(key, None)
    out.update(
        r=rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        init_lora_weights=True,
        use_dora=False,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
        peft_type="LORA",
    )
    if base:
        out["base_model_name_or_path"] = base
    return out


def _model_card(base: str | None, report_lines: list[str]) -> str:
    header = ["---", f"base_model: {base}" if base else "base_model: null", "library_name: peft", "tags:", "- lora", "- pissa", "---"]
    body = [
        "",
        "# LoRA adapter exported from a PiSSA fine-tune",
        "",
        "Apply it to the original base model (PEFT `PeftModel.from_pretrained(base, this_folder)` or vLLM",
        "`--enable-lora --lora-modules name=this_folder`). Written by `pissa export`.",
        "",
        *report_lines,
        "",
    ]
    return "\n".join(header + body)


def _resolve_rank(rank: int | str | None, tol: float) -> int | str | None:
    problems = []
    if isinstance(rank, str):
        if rank.strip().lower() == "auto":
            rank = "auto"
        elif rank.strip().isdigit():
            rank = int(rank)
        else:
            problems.append(f"--rank must be a positive integer or 'auto', got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        problems.append(f"--rank must be >= 1, got {rank}")
    if not 0 <= tol < 1:
        problems.append(f"--tol must be in [0, 1), got {tol}")
    if problems:
        raise InvalidOptionsError("invalid export options", problems, fix="correct the options above")
    return rank


def export(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | str | None = None,
    tol: float = EXPORT_TOL,
    merge: bool = False,
    bundle: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export a trained PiSSA adapter as a LoRA adapter (or merged model) for the original base.

    Args:
        source: run folder, checkpoint folder or adapter folder (see :func:`resolve_trained_adapter`).
        out: output folder; written to a temporary sibling and renamed into place when complete.
        rank: ``None`` for the exact rank-2r export; an int K for the best rank-K approximation;
            ``"auto"`` for the smallest vLLM rank whose worst-layer relative error is ``<= tol``.
        tol: tolerance of ``rank="auto"``.
        merge: write full weights ``W_res + s·B′A′`` instead of an adapter (``rank`` is then ignored).
        bundle: the bundle (default: recorded by ``pissa train``).
        overwrite: replace a non-empty ``out``.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: not from a bundle, init mismatch, shapes that disagree.
        InvalidOptionsError: bad ``rank`` / ``tol``.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false, or is (or holds) an input.
    """
    start = time.perf_counter()
    rank = _resolve_rank(rank, tol)
    if merge and rank is not None:
        raise InvalidOptionsError("invalid export options", ["--merge and --rank cannot be combined"],
                                  fix="drop one of them")
    trained = resolve_trained_adapter(source, bundle)
    if merge and trained.bundle.packed:
        raise ExportError(
            f"--merge of a run on a packed QPiSSA bundle ({trained.bundle.path}) is not supported yet: "
            "the residual is 4-bit",
            fix="export the LoRA adapter (no --merge) and merge it into the original base, or convert with "
                "--residual-dtype bfloat16",
        )
    config, pairs, init_pairs = check_compatible(trained)
    out_path = Path(out)
    check_not_an_input(out_path, [source, trained.path, trained.bundle.path])
    tmp = prepare_output(out_path, overwrite=overwrite)
    try:
        if merge:
            report = _write_merged(trained, config, pairs, tmp, out_path)
        else:
            report = _write_adapter(trained, config, pairs, init_pairs, tmp, out_path, rank, tol)
        move_into_place(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from dataclasses import replace

    report = replace(report, seconds=time.perf_counter() - start)
    logger.info("exported %s → %s (%s, rank %s, worst-layer error %.3g)", trained.path, out_path, report.mode,
                report.rank, report.max_rel_error)
    return report


def _smallest_vllm_rank(rank: int) -> int | None:
    return next((v for v in VLLM_LORA_RANKS if v >= rank), None)


def _write_adapter(
    trained: TrainedAdapter,
    config: dict[str, Any],
    pairs: dict[str, dict[str, Any]],
    init_pairs: dict[str, dict[str, Any]],
    tmp: Path,
    out: Path,
    rank: int | str | None,
    tol: float,
) -> ExportReport:
    import torch
    from safetensors.torch import load_file, save_file

    r = int(config["r"])
    alpha = float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    scaling = lora_scaling(config)
    base = trained.bundle.base_model
    modules = sorted(pairs)
    candidates: dict[int, float] = {}

    svds = {}
    quantized = trained.bundle.quantization is not None
    if rank is not None or quantized:  # QPiSSA: ‖ΔW‖ of every layer, for the quantization gap
        for m in modules:
            p, q = pairs[m], init_pairs[m]
            svds[m] = delta_svd(p["lora_A"], p["lora_B"], q["lora_A"], q["lora_B"], scaling)
        if rank == "auto":
            for cand in VLLM_LORA_RANKS:
                candidates[cand] = max(svds[m].rel_error(cand) for m in modules)
            chosen = pick_auto_rank(candidates, tol)
            if chosen is None:
                raise ExportError(
                    f"no vLLM rank up to {VLLM_LORA_RANKS[-1]} keeps every layer's error under --tol {tol}",
                    fix="raise --tol or export exactly (no --rank)",
                )
            rank = chosen
            logger.info("--rank auto: rank %d (worst-layer error %.3g <= tol %g)", rank, candidates[rank], tol)
    assert rank is None or isinstance(rank, int)

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerError] = []
    if rank is not None and rank > 2 * r:
        logger.info("--rank %d is above the exact rank %d: exporting exactly, at rank %d", rank, 2 * r, 2 * r)
    if rank is None or rank >= 2 * r:
        # Exact: ΔW = s·[B′, −B₀][A′; A₀], the same tensors PEFT's subtract_mutated_init writes.
        mode, out_rank, out_alpha, out_rslora = "exact", 2 * r, exported_alpha(alpha, rslora), rslora
        for m in modules:
            p, q = pairs[m], init_pairs[m]
            a, b = exact_delta_factors(p["lora_A"], p["lora_B"], q["lora_A"], q["lora_B"])
            tensors[p["keys"]["lora_A"]], tensors[p["keys"]["lora_B"]] = a, b
            norm = float(svds[m].s.double().norm()) if m in svds else None
            layers.append(LayerError(m, (b.shape[0], a.shape[1]), 0.0, norm))
    else:
        # Compressed: best rank-K approximation, written with scaling 1 (lora_alpha = K, no rsLoRA).
        mode, out_rank, out_alpha, out_rslora = "compressed", rank, float(rank), False
        for m in modules:
            p = pairs[m]
            a, b = truncate_delta(svds[m], rank, 1.0, dtype=p["lora_A"].dtype)
            tensors[p["keys"]["lora_A"]], tensors[p["keys"]["lora_B"]] = a, b
            layers.append(LayerError(m, (b.shape[0], a.shape[1]), svds[m].rel_error(rank), float(svds[m].s.double().norm())))

    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    reloaded = load_file(str(tmp / ADAPTER_WEIGHTS))
    if reloaded.keys() != tensors.keys() or any(not torch.equal(reloaded[k], v) for k, v in tensors.items()):
        raise ExportError(f"{tmp / ADAPTER_WEIGHTS} does not read back as written", fix="check the disk and retry")
    new_config = _exported_config(config, rank=out_rank, alpha=out_alpha, use_rslora=out_rslora, base=base)
    write_json(tmp / ADAPTER_CONFIG, new_config)

    worst = max((e.rel_error for e in layers), default=0.0)
    max_lora_rank = _smallest_vllm_rank(out_rank)
    quant_record = None
    if quantized:
        layers = _with_quant_gaps(layers, trained.bundle)
        gaps = [e.quant_gap for e in layers if e.quant_gap is not None]
        quant_record = {
            "storage": (trained.bundle.quantization or {}).get("storage"),
            "quant_gap": "‖deq(Q) + s·B₀A₀ − W‖_F / ‖ΔW‖_F per layer: the trained model is W + ΔW + that "
                         "difference; this adapter on the original W carries ΔW only",
            "max_quant_gap": max(gaps) if gaps else None,
            "mean_quant_gap": sum(gaps) / len(gaps) if gaps else None,
        }
    record = {
        "format": "pissa-export",
        "mode": mode,
        "rank": out_rank,
        "lora_alpha": out_alpha,
        "use_rslora": out_rslora,
        "base_model": base,
        "source": {
            "adapter": str(trained.path.resolve()),
            "adapter_sha256": sha256_file(trained.path / ADAPTER_WEIGHTS),
            "bundle": str(trained.bundle.path),
            "pissa_init_sha256": trained.bundle.recorded_init_sha256,
        },
        "trained": {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "scaling": scaling},
        "tol": tol if candidates else None,
        "candidates": {str(k): v for k, v in candidates.items()},
        "max_rel_error": worst,
        "max_lora_rank": max_lora_rank,
        "layers": [{"name": e.name, "shape": list(e.shape), "rel_error": e.rel_error, "delta_norm": e.delta_norm,
                    **({"quant_gap": e.quant_gap} if quantized else {})}
                   for e in layers],
        **({"quantization": quant_record} if quant_record else {}),
        "files": {ADAPTER_WEIGHTS: sha256_file(tmp / ADAPTER_WEIGHTS)},
    }
    write_json(tmp / EXPORT_RECORD, record)
    lines = [f"- export: {mode}, rank {out_rank}, lora_alpha {out_alpha:g}",
             f"- worst-layer relative error of ΔW: {worst:.3g}",
             f"- vLLM: `--max-lora-rank {max_lora_rank}`"]
    (tmp / model_format.CARD).write_text(_model_card(base, lines), encoding="utf-8")
    return ExportReport(out=out, mode=mode, rank=out_rank, lora_alpha=out_alpha, base_model=base,
                        max_rel_error=worst, layers=tuple(layers), candidates=candidates,
                        max_lora_rank=max_lora_rank)


def _with_quant_gaps(layers: list[LayerError], bundle: Bundle) -> list[LayerError]:
    """Each layer's ``‖deq(Q) + s·B₀A₀ − W‖ / ‖ΔW‖`` from the norm pissa.json recorded at conversion
    (``quant_error_norm``; None for bundles converted before it was recorded, or a zero ΔW)."""
    from dataclasses import replace

    matrices = bundle.matrices()
    out = []
    for e in layers:
        norm = (matrices.get(e.name) or {}).get("quant_error_norm")
        gap = float(norm) / e.delta_norm if norm is not None and e.delta_norm else None
        out.append(replace(e, quant_gap=gap))
    return out


def _write_merged(
    trained: TrainedAdapter, config: dict[str, Any], pairs: dict[str, dict[str, Any]], tmp: Path, out: Path
) -> ExportReport:
    """Full weights ``W_res + s·B′A′`` (= ``W + ΔW``) in the bundle's tensor names, dtypes and shards.

    Streams (:mod:`converter.merge`): one tensor in memory at a time, each shard re-read and compared.
    """
    bundle = trained.bundle
    records = bundle.matrices()
    try:
        residual = open_checkpoint(bundle.path)
    except (SourceNotFoundError, CorruptCheckpointError) as exc:
        raise ExportError(f"{bundle.path}: residual weights unusable: {exc.message}",
                          fix="re-create the bundle with `pissa convert` (`pissa verify` shows what is wrong)") from exc
    factors: dict[str, Factors] = {}
    module_of: dict[str, str] = {}
    for m, p in pairs.items():
        rec = records.get(m) or {}
        key = rec.get("key") or f"{m}.weight"
        factors[key] = Factors(p["lora_A"], p["lora_B"], bool(rec.get("fan_in_fan_out")))
        module_of[key] = m
    merged = write_merged_weights(residual, factors, lora_scaling(config), tmp)
    layers = [LayerError(module_of[e.key], e.shape, 0.0, e.delta_norm) for e in merged.layers]
    for name in residual.extra_files:
        shutil.copy2(bundle.path / name, tmp / name)
    base = bundle.base_model
    files = dict(merged.files)
    files.update({p.name: sha256_file(p) for p in tmp.iterdir() if p.is_file() and p.name not in files})
    write_json(tmp / EXPORT_RECORD, {
        "format": "pissa-export", "mode": "merged", "base_model": base,
        "source": {"adapter": str(trained.path.resolve()), "bundle": str(bundle.path)},
        "files": dict(sorted(files.items())),
    })
    (tmp / model_format.CARD).write_text(
        _model_card(base, ["- merged: full weights W + ΔW (= residual + trained PiSSA adapter)"]).replace(
            "- lora\n", ""), encoding="utf-8")
    return ExportReport(out=out, mode="merged", rank=None, lora_alpha=None, base_model=base, max_rel_error=0.0,
                        layers=tuple(layers))

"""``pissa verify BUNDLE [--source SOURCE]``: re-check everything a bundle's pissa.json claims.

0. pissa.json holds what the checks need (its format version, files, adapter and a non-empty matrix list);
1. every recorded file exists and has its recorded sha256, and every weight, index, config and adapter file
   of the bundle is recorded;
2. the adapter config agrees with the record (rank, alpha, rsLoRA, targets, init_lora_weights true);
3. every recorded matrix has ``lora_A [r, in]`` / ``lora_B [out, r]`` and a residual of the recorded
   shape (and no adapter tensor lacks a record), and the adapter's energy share
   ``‖s·BA‖² / ‖W_res + s·BA‖²`` equals the recorded one;
4. with ``source``: ``‖W − (W_res + s·BA)‖ / ‖W‖`` is within the residual dtype's rounding for every
   matrix (float32 1e-5, float16 2e-3, bfloat16 1e-2) and every other tensor equals the source's
   (after the recorded dtype cast); for a QPiSSA bundle (``quantization`` in pissa.json, residual
   ``deq(Q)``) that error is the quantization error and must equal the recorded ``rel_error`` (to 1%);
   a packed QPiSSA residual (bitsandbytes' 4-bit layout) is dequantized by bitsandbytes first, and its
   quant-state tensors must be exactly the ones the layout declares;
5. the matrices recorded as left out (MoE experts, routers) are in the residual model as recorded
   (patterns, tensor and matrix counts) and none of them was also converted (with ``source``, step 4
   shows they are the source's, untouched).

With ``source``, when more than :data:`SOURCE_PROBLEMS_LISTED` tensors differ and the source's files are not
the ones pissa.json records (``source.files``), the report is one line saying it is not this bundle's source.

All problems are collected and reported together. Shards are read one at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pissa.core.errors import VerificationError
from pissa.core.formats import adapter as adapter_format
from pissa.core.formats import bundle as B
from pissa.core.formats import model as model_format
from pissa.core.formats.dtypes import torch_dtype
from pissa.core.formats.safetensors import tensor_shapes
from pissa.core.hashing import sha256_file
from pissa.core.jsonio import is_number, read_json

log = logging.getLogger(__name__)

# Relative Frobenius error allowed for W ≈ W_res + s·BA, by residual dtype (its unit roundoff ×~4).
TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-3, "bfloat16": 1e-2}
ENERGY_RTOL = 2e-2
# With more tensor problems than this against a source whose files are not the recorded ones, one line says so.
SOURCE_PROBLEMS_LISTED = 3
# QPiSSA bundles: relative slack on the recorded ‖W − (deq(Q) + s·BA)‖ / ‖W‖ (float32 recomputation).
QUANT_RTOL = 1e-2


@dataclass(frozen=True)
class VerifyReport:
    bundle: Path
    files: int
    matrices: int
    max_rel_error: float | None  # against the source, when given
    problems: list[str] = field(default_factory=list)


def _load_record(bundle: Path) -> dict[str, Any]:
    try:
        record = B.read_record(bundle)
    except FileNotFoundError as exc:
        raise VerificationError(
            f"{bundle} is not a bundle", [f"{bundle / B.RECORD} is missing"], fix="convert it with pissa convert"
        ) from exc
    except ValueError as exc:
        raise VerificationError(f"{bundle} is damaged", [f"{B.RECORD} is not valid JSON ({exc})"]) from exc
    if record.get("format") != B.FORMAT:
        raise VerificationError(f"{bundle} is not a bundle", [f"{B.RECORD} has format {record.get('format')!r}"])
    problems = record_problems(record)
    if problems:
        raise VerificationError(f"{bundle} is damaged", [f"{B.RECORD}: {p}" for p in problems],
                                fix="re-convert the bundle (pissa convert --overwrite)")
    return record


_ADAPTER_FIELDS = ("r", "lora_alpha", "scaling", "target_modules", "fan_in_fan_out", "use_rslora")
_MATRIX_FIELDS = ("name", "key", "shape", "energy", "fan_in_fan_out")


def record_problems(record: dict[str, Any]) -> list[str]:
    """What pissa.json must hold for the checks below to mean anything (a record whose lists were emptied
    would verify nothing). Pure."""
    p: list[str] = []
    if record.get("format_version") != B.FORMAT_VERSION:
        p.append(f"format_version is {record.get('format_version')!r}; this pissa reads {B.FORMAT_VERSION}")
    files = record.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        p.append("files must map every file of the bundle to its sha256")
    adapter = record.get("adapter")
    if not isinstance(adapter, dict) or any(k not in adapter for k in _ADAPTER_FIELDS):
        p.append(f"adapter must be an object with {', '.join(_ADAPTER_FIELDS)}")
    matrices = record.get("matrices")
    quantized = B.QUANT_KEY in record
    if not isinstance(matrices, list) or not matrices or not all(_matrix_ok(m, quantized) for m in matrices):
        fields_ = (*_MATRIX_FIELDS, "rel_error") if quantized else _MATRIX_FIELDS
        p.append(f"matrices must list every converted matrix with {', '.join(fields_)} (shape: two integers, "
                 "energy a number)")
    quant = record.get(B.QUANT_KEY)
    if quantized and (not isinstance(quant, dict) or any(k not in quant for k in _QUANT_FIELDS)):
        p.append(f"quantization must be an object with {', '.join(_QUANT_FIELDS)}")
    return p


_QUANT_FIELDS = ("quant_type", "double_quant", "storage")


def _matrix_ok(m: Any, quantized: bool) -> bool:
    if not isinstance(m, dict) or any(k not in m for k in _MATRIX_FIELDS):
        return False
    shape = m["shape"]
    return (isinstance(shape, list) and len(shape) == 2 and all(is_number(d) and isinstance(d, int) for d in shape)
            and is_number(m["energy"]) and (not quantized or is_number(m.get("rel_error"))))


def _must_be_recorded(bundle: Path) -> list[str]:
    """The files whose content the bundle's meaning depends on: weights, their index, the model config and
    the adapter (relative paths)."""
    top = [f.name for f in bundle.iterdir() if f.is_file() and (
        f.name.endswith((".safetensors", ".safetensors.index.json")) or f.name == model_format.CONFIG)]
    init = bundle / B.INIT_DIR
    inner = [f"{B.INIT_DIR}/{f.name}" for f in init.iterdir() if f.is_file()] if init.is_dir() else []
    return sorted(top + inner)


def check_files(bundle: Path, record: dict[str, Any]) -> list[str]:
    """Problems with the recorded files' presence and checksums."""
    files = record.get("files")
    if not isinstance(files, dict):
        return ["pissa.json records no files"]
    problems = [f"{rel}: not recorded in pissa.json (added since conversion, or the record was edited)"
                for rel in _must_be_recorded(bundle) if rel not in files]
    for rel, digest in files.items():
        path = bundle / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: checksum differs from pissa.json (modified or corrupt)")
    return problems


def check_adapter_config(bundle: Path, record: dict[str, Any]) -> list[str]:
    adapter = record["adapter"]
    rel = f"{B.INIT_DIR}/{adapter_format.CONFIG}"
    if not (bundle / rel).is_file() and rel in (record.get("files") or {}):
        return []  # check_files reports it missing
    try:
        cfg = read_json(bundle / rel)
    except (OSError, ValueError) as exc:
        return [f"{B.INIT_DIR}/{adapter_format.CONFIG}: unreadable ({exc})"]
    problems = []
    for key, rec_key in (("r", "r"), ("lora_alpha", "lora_alpha"), ("use_rslora", "use_rslora"),
                         ("target_modules", "target_modules"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(key) != adapter.get(rec_key):
            problems.append(f"adapter_config {key}={cfg.get(key)!r} but pissa.json says {adapter.get(rec_key)!r}")
    if cfg.get("peft_type") != "LORA" or cfg.get("init_lora_weights") is not True:
        problems.append("adapter_config must be peft_type LORA with init_lora_weights true")
    return problems


def _weight_map(bundle: Path) -> dict[str, str]:
    index = bundle / model_format.SAFETENSORS_INDEX
    if index.exists():
        return read_json(index)["weight_map"]
    from safetensors import safe_open

    with safe_open(str(bundle / model_format.SAFETENSORS_SINGLE), framework="pt") as f:
        return dict.fromkeys(f.keys(), model_format.SAFETENSORS_SINGLE)


def check_tensors(bundle: Path, record: dict[str, Any], source_folder: Path | None) -> tuple[list[str], float | None]:
    """Shapes, energies and (with a source) the reconstruction of every matrix, shard by shard."""
    import torch
    from safetensors import safe_open

    problems: list[str] = []
    adapter = record["adapter"]
    scaling = float(adapter["scaling"])
    r = int(adapter["r"])
    residual_dtype = record.get("residual_dtype")
    quantized = B.QUANT_KEY in record
    quant = record.get(B.QUANT_KEY) or {}
    packed = quant.get("storage") == B.STORAGE_PACKED
    aux: set[str] = set()
    if packed:
        from converter.qpack import aux_keys

        for m in record["matrices"]:
            aux.update(aux_keys(m["key"], quant["quant_type"], bool(quant["double_quant"])))
    src_map: dict[str, str] = {}
    if source_folder is not None:
        from converter.checkpoint import open_checkpoint

        ckpt = open_checkpoint(source_folder, allow_pickle=bool(record.get("options", {}).get("allow_pickle")))
        src_map = {k: t.file for k, t in ckpt.tensors.items()}
    by_key = {m["key"]: m for m in record["matrices"]}
    weight_map = _weight_map(bundle)
    worst: float | None = None
    lora = safe_open(str(bundle / B.INIT_DIR / adapter_format.WEIGHTS), framework="pt")
    lora_keys = set(lora.keys())
    for shard in sorted(set(weight_map.values())):
        res = safe_open(str(bundle / shard), framework="pt")
        src_handles: dict[str, Any] = {}
        for key in [k for k, f in weight_map.items() if f == shard and k not in aux]:
            m = by_key.get(key)
            src = None
            if source_folder is not None:
                if key not in src_map:
                    problems.append(f"{key}: not in the source")
                    continue
                file = src_map[key]
                if file not in src_handles:
                    src_handles[file] = _open_source(source_folder / file)
                src = src_handles[file](key)
            if m is not None and packed:
                try:
                    w_res = _dequantize(bundle, weight_map, key, quant)
                except (KeyError, ValueError, RuntimeError) as exc:
                    problems.append(f"{key}: packed 4-bit weight unreadable ({exc})")
                    continue
            else:
                w_res = res.get_tensor(key)
            if m is None:
                if src is not None:
                    expected = src.to(torch_dtype(residual_dtype)) if residual_dtype and src.is_floating_point() else src
                    if not torch.equal(w_res, expected):
                        problems.append(f"{key}: differs from the source (not a target, should be copied)")
                continue
            a_key = adapter_format.adapter_key(m["name"], "lora_A")
            b_key = adapter_format.adapter_key(m["name"], "lora_B")
            if a_key not in lora_keys or b_key not in lora_keys:
                problems.append(f"{m['name']}: adapter tensors missing")
                continue
            a, b = lora.get_tensor(a_key).float(), lora.get_tensor(b_key).float()
            out_f, in_f = m["shape"]
            if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                problems.append(f"{m['name']}: adapter shapes {list(a.shape)}/{list(b.shape)} do not match {m['shape']}")
                continue
            # float32 is enough: the tolerances below are far above its rounding (~1e-7).
            w_res_f = w_res.float().T if m["fan_in_fan_out"] else w_res.float()
            delta = (b @ a).mul_(scaling)
            recon = delta.add_(w_res_f)  # in place: delta is not needed on its own again
            delta_norm = float(torch.linalg.vector_norm(recon - w_res_f))
            energy = delta_norm**2 / max(float(torch.linalg.vector_norm(recon)) ** 2, 1e-300)
            if abs(energy - m["energy"]) > ENERGY_RTOL * max(m["energy"], 1e-12):
                problems.append(f"{m['name']}: adapter energy share {energy:.5f} but pissa.json says {m['energy']:.5f}")
            if src is not None:
                w = src.float().T if m["fan_in_fan_out"] else src.float()
                if w.shape != recon.shape:
                    problems.append(f"{m['name']}: the source's tensor is {list(w.shape)}, the bundle's "
                                    f"{list(recon.shape)}")
                    continue
                err = float(torch.linalg.vector_norm(w - recon)) / max(float(torch.linalg.vector_norm(w)), 1e-300)
                worst = err if worst is None else max(worst, err)
                tol = TOLERANCE.get(residual_dtype or str(src.dtype).removeprefix("torch."), 1e-2)
                if quantized:
                    # W ≈ deq(Q) + s·BA up to the quantization error, which was recorded from the stored tensors.
                    tol = float(m["rel_error"]) * (1 + QUANT_RTOL) + 1e-6
                if err > tol:
                    problems.append(f"{m['name']}: ‖W − (W_res + s·BA)‖/‖W‖ = {err:.2e} exceeds {tol:.0e}")
    recorded_lora = {adapter_format.adapter_key(m["name"], part) for m in record["matrices"]
                     for part in ("lora_A", "lora_B")}
    problems += [f"{k}: adapter tensor of a matrix pissa.json does not record" for k in sorted(lora_keys - recorded_lora)]
    missing = sorted(set(by_key) - set(weight_map))
    missing_aux = sorted(aux - set(weight_map))
    problems += [f"{k}: quant-state tensor of a packed weight is missing" for k in missing_aux[:5]]
    problems += [f"{k}: recorded matrix has no residual tensor" for k in missing]
    return problems, worst


def _dequantize(bundle: Path, weight_map: dict[str, str], key: str, quant: dict[str, Any]) -> Any:
    """``deq(Q)`` (float32) of the packed weight ``key``, its quant state read from whichever shard holds it."""
    from safetensors import safe_open

    from converter.qpack import dequantize_packed

    def get(k: str) -> Any:
        with safe_open(str(bundle / weight_map[k]), framework="pt") as f:
            return f.get_tensor(k)

    return dequantize_packed(get, key, quant["quant_type"], bool(quant["double_quant"]))


def check_left_out(bundle: Path, record: dict[str, Any]) -> list[str]:
    """Problems with pissa.json's ``left_out`` entries against the residual model's tensors."""
    entries = record.get(B.LEFT_OUT_KEY) or []
    if not entries:
        return []
    from converter.targets import matrix_count, pattern_regex

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(_weight_map(bundle).values())):
        shapes.update(tensor_shapes(bundle / shard))
    converted = {m["key"] for m in record["matrices"]}
    problems = []
    for entry in entries:
        patterns = [pattern_regex(p) for p in entry.get("patterns") or []]
        keys = [k for k in shapes if any(p.match(k) for p in patterns)]
        count = sum(matrix_count(shapes[k]) for k in keys)
        if len(keys) != entry.get("tensors") or count != entry.get("count"):
            problems.append(
                f"left out {entry.get('kind')}: the bundle has {len(keys)} tensors / {count} matrices matching "
                f"{entry.get('patterns')}, pissa.json says {entry.get('tensors')} / {entry.get('count')}"
            )
        problems += [f"{k}: recorded both as converted and as left out" for k in sorted(converted.intersection(keys))]
    return problems


def source_changes(folder: Path, record: dict[str, Any]) -> list[str]:
    """The recorded source files (``source.files`` of pissa.json) whose sha256 differs in ``folder``, or
    that it lacks ([] when the record has none)."""
    recorded = (record.get("source") or {}).get("files") or {}
    return [rel for rel, digest in sorted(recorded.items())
            if not (folder / rel).is_file() or sha256_file(folder / rel) != digest]


def _open_source(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        return safe_open(str(path), framework="pt").get_tensor
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).__getitem__


def verify_bundle(bundle: str | Path, source: str | None = None) -> VerifyReport:
    """Verify a bundle (see the module docstring).

    Raises:
        VerificationError: one problem per line (all of them).
    """
    bundle = Path(bundle)
    record = _load_record(bundle)
    problems = check_files(bundle, record)
    problems += check_adapter_config(bundle, record)
    source_folder = None
    if source is not None:
        from converter.sources import resolve_source

        source_folder = resolve_source(source, revision=record.get("options", {}).get("revision")).folder
    worst = None
    if not problems:  # tensor checks need intact files
        tensor_problems, worst = check_tensors(bundle, record, source_folder)
        many = len(tensor_problems) > SOURCE_PROBLEMS_LISTED
        changed = source_changes(source_folder, record) if source_folder is not None and many else []
        if changed:
            # Not this bundle's source: one line, not one per tensor that differs.
            raise VerificationError(
                f"{source} is not the source {bundle} was converted from", [
                    f"--source {source} is not the source of {bundle}: its {', '.join(changed[:3])}"
                    f"{' …' if len(changed) > 3 else ''} differ from pissa.json's source.files "
                    f"({len(tensor_problems)} tensor problems follow from it)"],
                fix=f"give the source it was converted from ({record.get('source', {}).get('path') or 'see pissa.json'})")
        problems += tensor_problems
        problems += check_left_out(bundle, record)
    if problems:
        raise VerificationError(
            f"{bundle} failed verification", problems, fix="re-convert the bundle (pissa convert --overwrite)"
        )
    return VerifyReport(bundle, len(record["files"]), len(record["matrices"]), worst)

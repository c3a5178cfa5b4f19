"""Check LoRA adapters against the base they will be served on, as vLLM would, and then some.

vLLM refuses some adapters at load time (and an invalid adapter given at start-up kills the
server), and silently serves others wrong: an adapter trained for another base, or a PiSSA-style
adapter whose base weights were modified. Everything here runs before vLLM sees the adapter and
reports every problem of every adapter at once.

The checks (``check_adapter``), per adapter:

* config: ``peft_type`` is ``LORA``; ``r`` (and ``rank_pattern``) positive integers; no DoRA, no
  ``lora_bias``, ``bias == "none"``, ``modules_to_save`` empty (or only classifier/score), no
  aLoRA / layer_replication / BD-LoRA / QALoRA; ``init_lora_weights`` true/false or an init that
  only sets initial adapter weights (gaussian, eva, orthogonal, mica, lora_ga), never pissa*,
  olora, corda, loftq (those change the base weights: the adapter is meaningless on the original).
* tensors (shapes read from the safetensors header, no weights loaded): only LoRA tensors
  (``lora_A``/``lora_B``, ``lora_embedding_A``/``_B``), each module has both, the module exists in
  the base with a 2-D weight (linear layers and embeddings: what vLLM can adapt), and for a weight
  W [out, in]: A [r_m, in], B [out, r_m] (Conv1D with ``fan_in_fan_out``: W stored [in, out]);
  embeddings E [vocab, hidden]: A [r_m, vocab], B [hidden, r_m]; r_m is ``r`` or a ``rank_pattern``
  value.
* rank: the adapter's rank (largest r_m, ``r``, ``rank_pattern``) fits ``max_lora_rank``.
* pairing (the rule): the adapter's *recorded base* must name the served base. The recorded bases
  are ``base_model`` of the export record (:data:`export_format.RECORD_NAMES`, written by ``pissa export``)
  when present, and ``base_model_name_or_path`` of ``adapter_config.json``; each one present must
  match, and at least one must be present. A recorded base matches when it equals one of the served
  base's identities (the base value as given, its absolute path, and the manifest's
  ``base.aliases``) or, when both are local paths, resolves to the same folder. Nothing fuzzy
  (no basename or hub-suffix matching): declare a local copy of a hub model with ``aliases``.

The base itself (:func:`read_base`) is refused when its config.json names bitsandbytes quantization, e.g. a
packed QPiSSA bundle (:func:`quantization_problem`): one line that says what to serve instead.

``max_lora_rank`` for vLLM: the smallest allowed value (:data:`ALLOWED_MAX_LORA_RANKS`) that is
>= every adapter's rank and >= the manifest's ``max_lora_rank`` (room for runtime adapters).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pissa.core.errors import AdapterValidationError, HubError
from pissa.core.formats import adapter as adapter_format
from pissa.core.formats import bundle as bundle_format
from pissa.core.formats import export as export_format
from pissa.core.formats import model as model_format
from pissa.core.formats.safetensors import tensor_shapes
from pissa.core.hashing import sha256_file
from pissa.core.jsonio import read_json

logger = logging.getLogger(__name__)

ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ``init_lora_weights`` strings vLLM accepts: they only set the initial adapter weights.
SAFE_STRING_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")
#: PEFT part name -> the short kind the checks below use.
_KINDS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "EA", "lora_embedding_B": "EB"}


@dataclass(frozen=True)
class BaseInfo:
    """What the checks need to know about the served base.

    Attributes:
        location: the base as served (absolute path or hub id).
        identities: names that denote this base (see the pairing rule).
        weight_shapes: module name (``model.layers.0.self_attn.q_proj``) -> shape of its ``weight``.
        local_path: the base's folder on disk (None when unknown).
    """

    location: str
    identities: frozenset[str]
    weight_shapes: Mapping[str, tuple[int, ...]]
    local_path: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter as read from disk: config, tensor shapes and export record (no weights)."""

    name: str
    location: str
    config: Mapping[str, Any]
    tensor_shapes: Mapping[str, tuple[int, ...]]
    export_record: Mapping[str, Any] | None = None
    read_problems: tuple[str, ...] = ()
    weights_sha256: str | None = None


@dataclass(frozen=True)
class ValidationReport:
    """Result of a successful validation."""

    max_lora_rank: int
    ranks: dict[str, int] = field(default_factory=dict)


# --- pure checks --------------------------------------------------------------------------------
def select_max_lora_rank(ranks: Sequence[int], minimum: int | None = None) -> int:
    """Smallest value vLLM allows for ``--max-lora-rank`` that covers every rank (and ``minimum``).

    Raises:
        AdapterValidationError: a rank above the largest allowed value (512).
    """
    need = max([1, *ranks, *([minimum] if minimum else [])])
    for allowed in ALLOWED_MAX_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise AdapterValidationError(
        "rank too large",
        [f"rank {need} exceeds vLLM's largest max_lora_rank {ALLOWED_MAX_LORA_RANKS[-1]}"],
        fix="export the adapter at a lower rank (pissa export --rank K)",
    )


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """Problems of ``adapter_config.json`` alone (features vLLM refuses or serves wrong)."""
    p: list[str] = []
    if config.get("peft_type") != "LORA":
        p.append(f"peft_type is {config.get('peft_type')!r}, vLLM serves only LORA adapters")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        p.append(f"r must be a positive integer, got {r!r}")
    for key, value in (config.get("rank_pattern") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            p.append(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
    if config.get("use_dora"):
        p.append("uses DoRA (use_dora), which vLLM does not support")
    if config.get("lora_bias"):
        p.append("uses lora_bias, which vLLM does not support")
    if config.get("bias", "none") != "none":
        p.append(f"bias is {config.get('bias')!r}; vLLM supports only bias='none'")
    bad_save = [m for m in (config.get("modules_to_save") or []) if m not in ("classifier", "score")]
    if bad_save:
        p.append(f"has modules_to_save {bad_save}, which vLLM does not serve (export without them)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SAFE_STRING_INITS:
        p.append(
            f"init_lora_weights is {init!r}: a {init.split('_')[0]}-style init changes the base weights, "
            "so on the original base this adapter is silently wrong; export it with `pissa export` "
            "(which writes init_lora_weights=true)"
        )
    elif not isinstance(init, bool | str):
        p.append(f"init_lora_weights must be true/false or a string, got {init!r}")
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            p.append(f"uses {what} ({key}), which vLLM does not support")
    return p


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A.weight`` -> ``(<module>, "A")`` (None: not a LoRA tensor)."""
    split = adapter_format.split_adapter_key(key)
    return None if split is None else (split[0], _KINDS[split[1]])


def allowed_ranks(config: Mapping[str, Any]) -> set[int]:
    r = config.get("r")
    out = {r} if isinstance(r, int) and not isinstance(r, bool) else set()
    out |= {v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int)}
    return out


def tensor_problems(
    config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]], base: BaseInfo
) -> list[str]:
    """Problems of the adapter's tensors against the base's weight shapes (see module docstring)."""
    p: list[str] = []
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensor_shapes.items():
        split = split_adapter_key(key)
        if split is None:
            p.append(f"tensor {key!r} is not a LoRA tensor (lora_A/lora_B); vLLM cannot serve it")
            continue
        module, kind = split
        modules.setdefault(module, {})[kind] = tuple(shape)
    if not modules and not p:
        p.append("contains no LoRA tensors")
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    ranks = allowed_ranks(config)
    missing_modules: list[str] = []
    for module, parts in sorted(modules.items()):
        embedding = "EA" in parts or "EB" in parts
        a_key, b_key = ("EA", "EB") if embedding else ("A", "B")
        if a_key not in parts or b_key not in parts:
            p.append(f"module {module}: has only {'A' if a_key in parts else 'B'} of its LoRA pair")
            continue
        a, b = parts[a_key], parts[b_key]
        if len(a) != 2 or len(b) != 2:
            p.append(f"module {module}: LoRA tensors must be 2-D, got A {list(a)} and B {list(b)}")
            continue
        if module not in base.weight_shapes:
            missing_modules.append(module)
            continue
        w = base.weight_shapes[module]
        if len(w) != 2:
            p.append(f"module {module}: the base weight is {len(w)}-D {list(w)}; vLLM adapts only "
                     "linear layers and embeddings")
            continue
        if embedding:
            vocab, hidden = w
            want_a, want_b = ("r", vocab), (hidden, "r")
        else:
            out_f, in_f = (w[1], w[0]) if fan_in_fan_out else (w[0], w[1])
            want_a, want_b = ("r", in_f), (out_f, "r")
        r_m = a[0]
        if a[1] != want_a[1] or b[0] != want_b[0] or b[1] != r_m:
            p.append(
                f"module {module}: shapes A {list(a)} / B {list(b)} do not fit the base weight {list(w)} "
                f"(expected A [r, {want_a[1]}] and B [{want_b[0]}, r])"
            )
            continue
        if ranks and r_m not in ranks:
            p.append(f"module {module}: rank {r_m} is neither r nor a rank_pattern value {sorted(ranks)}")
    if missing_modules:
        shown = ", ".join(missing_modules[:3]) + (f" and {len(missing_modules) - 3} more" if len(missing_modules) > 3 else "")
        p.append(f"targets modules the base does not have: {shown} (an adapter for another architecture?)")
    return p


def adapter_rank(config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Largest rank the adapter uses (config ``r``, ``rank_pattern``, and the actual lora_A rows)."""
    ranks = set(allowed_ranks(config))
    for key, shape in tensor_shapes.items():
        split = split_adapter_key(key)
        if split and split[1] in ("A", "EA") and shape:
            ranks.add(int(shape[0]))
    return max(ranks, default=0)


def recorded_bases(adapter: AdapterInfo) -> list[tuple[str, str | None]]:
    """``(where, recorded base)`` pairs: export record's ``base_model`` and the config's field."""
    out: list[tuple[str, str | None]] = []
    if adapter.export_record is not None:
        out.append(("export record base_model", adapter.export_record.get("base_model")))
    out.append(("adapter_config base_model_name_or_path", adapter.config.get("base_model_name_or_path")))
    return out


def _same_local_folder(a: str, b: str | None) -> bool:
    if not b:
        return False
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def pairing_problems(adapter: AdapterInfo, base: BaseInfo) -> list[str]:
    """Problems with the adapter's recorded base(s) under the pairing rule (module docstring)."""
    p: list[str] = []
    found = False
    for where, recorded in recorded_bases(adapter):
        if recorded is None or recorded == "":
            continue
        found = True
        if not isinstance(recorded, str):
            p.append(f"{where} must be a string, got {recorded!r}")
            continue
        if recorded in base.identities or (
            base.local_path is not None and _same_local_folder(base.local_path, recorded)
        ):
            continue
        hint = ""
        if Path(recorded).is_dir() and (Path(recorded) / bundle_format.RECORD).exists():
            hint = (" — that is a PiSSA bundle (residual model): an adapter for it is wrong on the original "
                    "base; export it with `pissa export`, or serve the bundle as the base")
        p.append(
            f"was made for base {recorded!r} ({where}), not for the served base {base.location!r}{hint}"
        )
    if not found:
        p.append("records no base model (base_model_name_or_path is empty), so it cannot be paired "
                 "with the served base")
    return p


def record_problems(adapter: AdapterInfo) -> list[str]:
    """The export record's sha256 of the adapter weights must match the file (no silent edits)."""
    if adapter.export_record is None or adapter.weights_sha256 is None:
        return []
    recorded = (adapter.export_record.get("files") or {}).get(adapter_format.WEIGHTS)
    if recorded and recorded != adapter.weights_sha256:
        return ["adapter_model.safetensors changed since export (sha256 differs from its export record)"]
    return []


def check_adapter(adapter: AdapterInfo, base: BaseInfo, max_lora_rank: int | None = None) -> list[str]:
    """Every problem of one adapter on this base (empty: vLLM will serve it correctly)."""
    if adapter.read_problems:
        return list(adapter.read_problems)
    p = config_problems(adapter.config)
    p += tensor_problems(adapter.config, adapter.tensor_shapes, base)
    p += pairing_problems(adapter, base)
    p += record_problems(adapter)
    rank = adapter_rank(adapter.config, adapter.tensor_shapes)
    limit = max_lora_rank if max_lora_rank is not None else ALLOWED_MAX_LORA_RANKS[-1]
    if rank > limit:
        p.append(f"rank {rank} exceeds max_lora_rank {limit}")
    return p


def check_adapters(
    adapters: Sequence[AdapterInfo], base: BaseInfo, *, min_max_lora_rank: int | None = None,
    max_lora_rank: int | None = None,
) -> tuple[list[str], int]:
    """Check all adapters; returns ``(problems, max_lora_rank)``, each problem prefixed by the adapter.

    Args:
        adapters: what :func:`read_adapter` returned for each.
        base: what :func:`read_base` returned.
        min_max_lora_rank: the manifest's wish (room for runtime adapters).
        max_lora_rank: a fixed limit (a running server's), instead of selecting one.
    """
    problems: list[str] = []
    ranks = []
    for adapter in adapters:
        for prob in check_adapter(adapter, base, max_lora_rank):
            problems.append(f"adapter {adapter.name!r} ({adapter.location}): {prob}")
        ranks.append(adapter_rank(adapter.config, adapter.tensor_shapes))
    if max_lora_rank is not None:
        return problems, max_lora_rank
    try:
        selected = select_max_lora_rank(ranks, min_max_lora_rank)
    except AdapterValidationError as exc:
        problems += exc.problems()
        selected = ALLOWED_MAX_LORA_RANKS[-1]
    return problems, selected


# --- reading from disk (the thin IO driver) -----------------------------------------------------
def _local_model_folder(ref_value: str, is_local: bool, patterns: list[str], revision: str | None) -> Path:
    """The folder itself, or the hub repo's snapshot through the pipeline's one Hub client.

    Raises:
        HubError: the download failed (one line with what to do).
    """
    if is_local:
        return Path(ref_value)
    from pissa.core.hub import download_repo

    return download_repo(ref_value, revision, allow_patterns=patterns)


def read_base(
    location: str, *, is_local: bool, aliases: Sequence[str] = (), given: str | None = None,
    revision: str | None = None,
) -> BaseInfo:
    """Read the served base's identities and weight shapes (headers only).

    Args:
        location: a folder, or a hub id (downloaded with :func:`pissa.core.hub.download_repo`).
        revision: for a hub id: branch, tag or commit (None: ``main``).

    Raises:
        AdapterValidationError: the base cannot be fetched or read (no config or safetensors weights).
    """
    identities = {location, *aliases}
    if given:
        identities.add(given)
    try:
        folder = _local_model_folder(location, is_local, ["*.json", "*.safetensors"], revision)
    except HubError as exc:
        raise AdapterValidationError(
            "base unreadable", [f"base {location!r}: cannot fetch it: {exc}"],
            fix="check the base path or hub id (and HF_HUB_OFFLINE / the cache)",
        ) from exc
    if is_local:
        identities.add(str(folder.resolve()))
    if not folder.is_dir():
        raise AdapterValidationError("base unreadable", [f"base {location!r} is not a folder"],
                                     fix="give the model's folder (config.json and *.safetensors), or a hub id")
    config_path = folder / model_format.CONFIG
    # Mistral's own format (params.json, no config.json) is served by vLLM with --config-format mistral.
    mistral = not config_path.exists() and (folder / "params.json").is_file()
    config = {} if mistral else _read_json(config_path)
    if config is None:
        problem = "has a config.json that is not a JSON object" if config_path.exists() else "has no config.json"
        raise AdapterValidationError("base unreadable", [f"base {location!r} {problem}, so it is not a model folder "
                                                         "vLLM can serve"],
                                     fix="give the model's folder as transformers saves it (save_pretrained)")
    quantized = quantization_problem(location, folder, config)
    if quantized:
        raise AdapterValidationError("base unservable", [quantized[0]], fix=quantized[1])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterValidationError(
            "base unreadable", [f"base {location!r}: no *.safetensors weights in {folder}"],
            fix="serve a model folder with safetensors weights (pissa convert writes them)",
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            for key, shape in tensor_shapes(file).items():
                if key.endswith(".weight"):
                    shapes[key[: -len(".weight")]] = shape
        except (OSError, ValueError) as exc:
            raise AdapterValidationError(
                "base unreadable", [f"base {location!r}: {file.name} is not readable safetensors: {exc}"],
                fix="repair or re-download the base",
            ) from exc
    if "lm_head" not in shapes:
        # Tied output layer: lm_head shares the input embedding's weight [vocab, hidden].
        embed = next((k for k in shapes if k.rsplit(".", 1)[-1] in _EMBEDDING_NAMES), None)
        if embed is not None and config.get("tie_word_embeddings", True):
            shapes["lm_head"] = shapes[embed]
    return BaseInfo(location, frozenset(identities), shapes, str(folder.resolve()) if is_local else str(folder))


def quantization_problem(location: str, folder: Path, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(problem, fix)`` when the base's weights are bitsandbytes-quantized (``quantization_config`` in its
    config.json, e.g. a packed QPiSSA bundle), else None. vLLM's CPU build has no bitsandbytes support (it
    refuses the model after start-up), and the shape checks would read the packed bytes' shapes; a GPU
    build was not tried, so ``pissa serve`` refuses such a base everywhere. Pure but for reading pissa.json."""
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping) or quant.get("quant_method") != "bitsandbytes":
        return None
    if bundle_format.is_bundle(folder):
        return (f"base {location!r} is a QPiSSA bundle whose residual is stored packed in 4 bits (bitsandbytes), "
                "which pissa serve cannot serve",
                "serve the trained run's export on the original model: `pissa export RUN --out LORA`, then "
                "`pissa serve --base ORIGINAL --adapter NAME=LORA`")
    return (f"base {location!r} holds bitsandbytes-quantized weights, which pissa serve cannot serve",
            "serve the model's unquantized weights")


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or not one (reported by the caller)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_adapter(name: str, location: str, *, is_local: bool, revision: str | None = None) -> AdapterInfo:
    """Read an adapter folder (or hub repo, at ``revision``): config, tensor shapes, export record.

    Problems reading it (a Hub download failure included) are returned in ``read_problems``
    (never raised), so every adapter is reported.
    """
    try:
        folder = _local_model_folder(location, is_local, ["*.json", "*.safetensors", "*.bin", "*.pt"], revision)
    except HubError as exc:
        return AdapterInfo(name, location, {}, {}, None, (f"cannot fetch it: {exc}",))
    if not folder.is_dir():
        return AdapterInfo(name, location, {}, {}, None, (f"{folder} is not a folder",))
    cfg_path = folder / adapter_format.CONFIG
    if not cfg_path.exists():
        return AdapterInfo(name, location, {}, {}, None, (f"no adapter_config.json in {folder} (not a PEFT adapter)",))
    config = _read_json(cfg_path)
    if config is None:
        return AdapterInfo(name, location, {}, {}, None, (f"{cfg_path} is not a JSON object",))
    weights = next((folder / f for f in adapter_format.WEIGHT_FILES if (folder / f).exists()), None)
    if weights is None:
        return AdapterInfo(name, location, config, {}, None, (f"no adapter_model.safetensors in {folder}",))
    if weights.suffix != ".safetensors":
        return AdapterInfo(name, location, config, {}, None, (
            f"{weights.name} is a pickle file; convert it to adapter_model.safetensors first",))
    try:
        shapes = tensor_shapes(weights)
    except (OSError, ValueError) as exc:
        return AdapterInfo(name, location, config, {}, None, (f"{weights} is not readable safetensors: {exc}",))
    record = None
    for fname in export_format.RECORD_NAMES:
        if (folder / fname).exists():
            record = _read_json(folder / fname)
            if record is None:
                return AdapterInfo(name, location, config, shapes, None, (f"{folder / fname} is not a JSON object",))
            break
    digest = None
    if record is not None and (record.get("files") or {}).get(weights.name):
        digest = sha256_file(weights)
    return AdapterInfo(name, location, config, shapes, record, (), digest)


def validate_adapters(
    base: BaseInfo, adapters: Sequence[tuple[str, str, bool]], *, min_max_lora_rank: int | None = None,
    max_lora_rank: int | None = None,
) -> ValidationReport:
    """Read and check ``(name, location, is_local)`` adapters against ``base``; all problems at once.

    Returns:
        the selected ``max_lora_rank`` and each adapter's rank.

    Raises:
        AdapterValidationError: one line per problem of every adapter.
    """
    infos = [read_adapter(n, loc, is_local=local) for n, loc, local in adapters]
    problems, rank = check_adapters(
        infos, base, min_max_lora_rank=min_max_lora_rank, max_lora_rank=max_lora_rank
    )
    if problems:
        raise AdapterValidationError(
            f"{len(problems)} adapter problem(s)", problems,
            fix="fix or remove these adapters; nothing was started or loaded",
        )
    ranks = {i.name: adapter_rank(i.config, i.tensor_shapes) for i in infos}
    logger.info("validated %d adapter(s) against %s; max_lora_rank %d", len(infos), base.location, rank)
    return ValidationReport(rank, ranks)

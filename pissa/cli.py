"""The ``pissa`` console script: a click group whose subcommands are imported only when run.

Each subcommand lives in ``pissa/commands/<name>.py`` as a click command named like the module; it
parses its options, calls one public library function and formats the result. This module only
knows the names and one-line help of the commands, so ``pissa --help`` imports neither torch nor
transformers.

Errors: every :class:`pissa.core.errors.PissaError` becomes one line per problem on stderr and its exit
code; anything else becomes a one-line "internal error". ``PISSA_DEBUG=1`` shows the traceback. An error
that another process of the same run prints (``already_reported``: a torchrun rank that only stopped
because another rank failed) prints nothing here, only its exit code.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
from typing import Any

import click

from pissa.core import __version__
from pissa.core.errors import PissaError, format_problems

# name -> (module under pissa.commands, one-line help). Order is the order of ``pissa --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert", "Convert a checkpoint (folder, .gguf, hub id) into a PiSSA bundle."),
    "verify": ("verify", "Re-check a bundle: checksums, adapter vs records, W = W_res + s·BA."),
    "train": ("train", "Fine-tune a bundle's PiSSA adapter (or a plain-LoRA baseline)."),
    "plot": ("plot", "Plot the loss curves of one or more training runs."),
    "export": ("export", "Export a trained PiSSA adapter as a LoRA adapter for the original base."),
    "serve": ("serve", "Serve one base and many LoRA adapters with vLLM (OpenAI API)."),
    "adapters": ("adapters", "Add, remove or list adapters on a running server."),
    "tenants": ("tenants", "Tenant keys (add, revoke, list) and usage of a gateway manifest."),
    "zoo": ("zoo", "Convert (verify, push) every model of a zoo manifest; resumable."),
    "push": ("push", "Verify and push a bundle or adapter to the Hugging Face Hub."),
    "demo": ("demo", "Run the whole pipeline offline on the embedded SmolLM2-135M-Instruct."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, _ = COMMANDS[cmd_name]
        module = importlib.import_module(f"pissa.commands.{module_name}")
        command: click.Command = getattr(module, module_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from the table above, without importing any of them."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Our own loggers report at INFO by default; libraries stay at WARNING unless -vv.
    for name in ("pissa", "converter", "training", "serving"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if verbose < 2:
        bnb.addFilter(_no_hub_kernel_warning)  # a set: adding it twice keeps one
    else:
        bnb.removeFilter(_no_hub_kernel_warning)


def _no_hub_kernel_warning(record: logging.LogRecord) -> bool:
    """bitsandbytes warns at import, on AVX512-BF16 CPUs, that it cannot fetch an optional kernel from the Hub
    (the ``kernels`` package): nothing a user of this tool should act on; its own CPU path is used (-vv shows it)."""
    return "from kernels-community" not in str(record.msg)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pissa")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug, libraries too).")
def cli(verbose: int) -> None:
    """PiSSA pipeline: convert checkpoints to PiSSA bundles, fine-tune, export LoRA, serve with vLLM."""
    _setup_logging(verbose)


def run(args: list[str] | None = None, **kwargs: Any) -> int:
    """Run the CLI and return the exit code instead of exiting (used by ``main`` and tests)."""
    try:
        cli.main(args=args, standalone_mode=False, **kwargs)
    except PissaError as exc:
        if os.environ.get("PISSA_DEBUG") == "1":
            raise
        if not exc.already_reported:  # e.g. another torchrun rank prints it
            for line in format_problems(exc):
                click.echo(line, err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as exc:  # `pissa`, `pissa tenants` alone: the help, as always
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:  # a usage error: one line too, not Click's usage block
        ctx = getattr(exc, "ctx", None)
        hint = f" — see `{ctx.command_path} --help`" if isinstance(exc, click.UsageError) and ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence, one line unless debugging
        if os.environ.get("PISSA_DEBUG") == "1":
            raise
        click.echo(
            f"error: internal error: {type(exc).__name__}: {exc} — rerun with PISSA_DEBUG=1 for the "
            "traceback and report it",
            err=True,
        )
        return 1
    return 0


def main() -> None:
    code = run()
    # Exit without the interpreter's last full garbage collection over every object torch and
    # transformers created (~0.3 s of a `pissa convert` of SmolLM2 that takes ~3.5 s, measured with
    # `time python -c "import torch"` against the same plus `gc.freeze()`): frozen objects are
    # skipped by that collection. atexit handlers, buffered output and finalizers of modules run as usual.
    gc.freeze()
    sys.exit(code)

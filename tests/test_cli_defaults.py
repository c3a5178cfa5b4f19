"""Every CLI default is the library's: a click option never restates a default that can drift.

For each command, the value its callback receives when the user gives no option (click's own parsing)
is compared with the default of the same name in the options dataclass or the library function the
command calls. ``default_of`` (pissa/commands/common.py) is how the commands read those defaults.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import click
import pytest

from pissa.cli import COMMANDS
from pissa.commands.common import default_of


def _counterparts() -> dict[str, list[Any]]:
    """command -> where its defaults live (imported here: some of them import torch)."""
    from converter.convert import convert
    from converter.export import export
    from converter.options import ConvertOptions
    from converter.push import push
    from converter.verify import verify_bundle
    from converter.zoo import run_zoo
    from pissa.demo import run_demo
    from serving.client import add_adapter
    from serving.gateway.admin import usage
    from serving.launcher import serve
    from serving.manifest import resolve_manifest
    from training.options import TrainOptions
    from training.plot import plot_runs
    from training.train import train

    return {
        "convert": [ConvertOptions, convert],
        "verify": [verify_bundle],
        "train": [TrainOptions, train],
        "plot": [plot_runs],
        "export": [export],
        "serve": [resolve_manifest, serve],
        "add": [add_adapter],
        "remove": [],  # --url: pissa serve's address (test_help_texts_state_the_library_defaults)
        "list": [],
        "add-key": [],  # no options
        "revoke": [],
        "usage": [usage],
        "zoo": [run_zoo],
        "push": [push],
        "demo": [run_demo],
    }


# Options whose library counterpart has another name: (command, option) -> (library name, value map).
_RENAMED: dict[tuple[str, str], tuple[str, Callable[[Any], Any]]] = {
    ("convert", "quiet"): ("progress", lambda v: not v),
    ("train", "no_progress"): ("progress", lambda v: not v),
    ("zoo", "quiet"): ("progress", lambda v: not v),
    ("serve", "log_file"): ("log_path", lambda v: v),
}


def _commands() -> Iterator[tuple[str, click.Command]]:
    for name, (module, _) in COMMANDS.items():
        command = getattr(importlib.import_module(f"pissa.commands.{module}"), module)
        if isinstance(command, click.Group):
            yield from command.commands.items()
        else:
            yield name, command


def _given_nothing(command: click.Command) -> dict[str, Any]:
    """What the command's callback receives for each option when the user gives none."""
    ctx = command.make_context(command.name or "", [], resilient_parsing=True)
    options = {p.name for p in command.params if isinstance(p, click.Option)}
    return {k: v for k, v in ctx.params.items() if k in options}


def _library_default(owner: Any, name: str) -> tuple[bool, Any]:
    try:
        return True, default_of(owner, name)
    except LookupError:
        return False, None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):  # repeatable options: () ~ None
        return tuple(a or ()) == tuple(b or ())
    if a is None or b is None:
        return a is b
    return type(a) is type(b) and a == b


def drift(name: str, command: click.Command, owners: list[Any]) -> tuple[list[str], set[str]]:
    """(every option whose default differs from its library counterpart's, the options compared)."""
    problems: list[str] = []
    compared: set[str] = set()
    for option, value in _given_nothing(command).items():
        target, convert = _RENAMED.get((name, option), (option, lambda v: v))
        for owner in owners:
            found, expected = _library_default(owner, target)
            if not found:
                continue
            compared.add(option)
            if not _same(convert(value), expected):
                problems.append(f"{name} --{option.replace('_', '-')}: {convert(value)!r}, "
                                f"{getattr(owner, '__qualname__', owner)}.{target}: {expected!r}")
    return problems, compared


def test_every_cli_default_is_the_library_default() -> None:
    counterparts = _counterparts()
    problems: list[str] = []
    for name, command in _commands():
        assert name in counterparts, f"add pissa {name} to _counterparts()"
        found, compared = drift(name, command, counterparts[name])
        problems += found
        assert compared or not counterparts[name], f"pissa {name}: no option compared with {counterparts[name]}"
    assert problems == []


@pytest.mark.parametrize(("command_name", "owner_name"), [("convert", "ConvertOptions"), ("train", "TrainOptions")])
def test_every_option_field_has_a_compared_cli_option(command_name: str, owner_name: str) -> None:
    """The options dataclasses are covered whole (``extra`` is for library callers only)."""
    command = dict(_commands())[command_name]
    owner = next(o for o in _counterparts()[command_name] if getattr(o, "__name__", "") == owner_name)
    _, compared = drift(command_name, command, [owner])
    assert {f.name for f in fields(owner)} - {"extra"} == compared


def test_a_drifted_default_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails when a click default is written out again and no longer agrees."""
    commands = dict(_commands())
    convert, train, zoo = commands["convert"], commands["train"], commands["zoo"]
    monkeypatch.setattr(next(p for p in convert.params if p.name == "svd_tol"), "default", 0.123)
    monkeypatch.setattr(next(p for p in train.params if p.name == "lr"), "default", 0.456)
    monkeypatch.setattr(next(p for p in zoo.params if p.name == "workers"), "default", 97)
    found = {n: drift(n, commands[n], _counterparts()[n])[0] for n in ("convert", "train", "zoo")}
    options, run_zoo = _counterparts()["convert"][0], _counterparts()["zoo"][0]
    trains = _counterparts()["train"][0]
    assert found == {
        "convert": [f"convert --svd-tol: 0.123, ConvertOptions.svd_tol: {default_of(options, 'svd_tol')!r}"],
        "train": [f"train --lr: 0.456, TrainOptions.lr: {default_of(trains, 'lr')!r}"],
        "zoo": [f"zoo --workers: 97, run_zoo.workers: {default_of(run_zoo, 'workers')!r}"],
    }


def test_help_texts_state_the_library_defaults() -> None:
    """Defaults only stated in help (the manifest's or the server's) come from the same place."""
    from converter.zoo import DEFAULT_ROOT
    from serving.manifest import VllmSettings

    commands = dict(_commands())
    helps = {(n, p.name): p.help or "" for n, c in commands.items() for p in c.params if isinstance(p, click.Option)}
    vllm = VllmSettings()
    assert helps[("serve", "host")].endswith(f"[manifest or {vllm.host}].")
    assert helps[("serve", "port")].endswith(f"[manifest or {vllm.port}].")
    assert helps[("serve", "dtype")].endswith(f"[manifest or {vllm.dtype}].")
    assert f"./{DEFAULT_ROOT})" in helps[("zoo", "out")]
    from pissa.commands.adapters import adapters

    for name in ("add", "remove", "list"):
        assert _given_nothing(adapters.commands[name])["url"] == f"http://{vllm.host}:{vllm.port}"


@dataclass(frozen=True)
class _Options:
    plain: int = 3
    made: list[int] = field(default_factory=lambda: [1])


def _function(a: int, *, b: float = 0.5) -> None:
    del a, b


def test_default_of_reads_dataclasses_pydantic_models_and_functions() -> None:
    import pydantic

    class Model(pydantic.BaseModel):
        port: int = 8000
        names: list[str] = pydantic.Field(default_factory=list)
        required: str

    assert default_of(_Options, "plain") == 3 and default_of(_Options, "made") == [1]
    assert default_of(_function, "b") == 0.5
    assert default_of(Model, "port") == 8000 and default_of(Model, "names") == []
    for owner, name in ((_Options, "nope"), (_function, "a"), (_function, "nope"), (Model, "required")):
        with pytest.raises(LookupError):
            default_of(owner, name)

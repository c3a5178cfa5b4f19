"""The generic manifest layer: YAML with line numbers, strict pydantic models, every problem at once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from pissa.core.errors import ManifestError
from pissa.core.manifests import (
    NAME_RULE,
    ManifestModel,
    Seq,
    check,
    format_key_path,
    load_yaml,
    name_problem,
    parse_yaml,
)

TEXT = """\
name: demo
defaults:
  rank: 16
  alpha: 32.0
entries:
  - name: a
    ranks: [8, 16]
  - name: b
    ranks: 4
"""


def test_lines_per_key_path() -> None:
    doc = parse_yaml(TEXT, "m.yaml")
    assert doc.data["entries"][1] == {"name": "b", "ranks": 4}
    assert doc.lines[("name",)] == 1
    assert doc.lines[("defaults", "alpha")] == 4
    assert doc.lines[("entries", 0)] == 6
    assert doc.lines[("entries", 1, "ranks")] == 9
    assert doc.lines[("entries", 0, "ranks", 1)] == 7
    # unknown paths fall back to the nearest ancestor
    assert doc.line(("entries", 1, "missing")) == 8
    # scalars as written, to quote them back
    assert doc.texts[("defaults", "alpha")] == "32.0" and doc.texts[("entries", 1, "ranks")] == "4"


def test_keys_are_names_as_written() -> None:
    """YAML 1.1 reads the key `on:` as true and `1:` as 1 (equal keys in Python): keys stay as written."""
    doc = parse_yaml("on: 1\n1: x\nyes: 2\n", "k.yaml")
    assert doc.data == {"on": 1, "1": "x", "yes": 2} and doc.lines[("on",)] == 1


def test_format_key_path() -> None:
    assert format_key_path(("entries", 2, "ranks", 0)) == "entries[2].ranks[0]"
    assert format_key_path(()) == "<top level>"


def test_syntax_error_has_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ManifestError) as err:
        load_yaml(p)
    (problem,) = err.value.problems()
    assert problem.startswith(f"{p}: line ") and "YAML syntax error" in problem


def test_duplicate_keys_all_reported() -> None:
    with pytest.raises(ManifestError) as err:
        parse_yaml("a: 1\nb: 2\na: 3\nc:\n  x: 1\n  x: 2\n", "d.yaml")
    problems = err.value.problems()
    assert problems == [
        "d.yaml: line 3: a: duplicate key (first on line 1)",
        "d.yaml: line 6: c.x: duplicate key (first on line 5)",
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")


class Entry(ManifestModel):
    name: str
    ranks: Seq[Annotated[int, Field(ge=1)]] = (16,)
    private: bool = False
    alpha: Annotated[float, Field(gt=0)] | None = None


class Demo(ManifestModel):
    name: str
    rank: int = 16
    defaults: Entry | None = None
    entries: Annotated[Seq[Entry], Field(min_length=1)]


def test_every_problem_at_once_in_line_order() -> None:
    text = """\
name: 3
rnak: 16
entries:
  - name: ok
    ranks: [8, 0, 8]
    private: "yes"
  - just a string
  - name: x
    alpha: -1
  - ranks: 4
"""
    checked = check(parse_yaml(text, "z.yaml"), Demo)
    assert checked.value is None
    with pytest.raises(ManifestError) as err:
        checked.result()
    assert err.value.problems() == [
        'z.yaml: line 1: name: must be a string, got the number 3 — quote it: "3"',
        "z.yaml: line 2: rnak: unknown key (did you mean 'rank'?)",
        "z.yaml: line 5: entries[0].ranks[1]: must be >= 1, got 0",
        "z.yaml: line 6: entries[0].private: must be true or false, got a string 'yes'",
        "z.yaml: line 7: entries[1]: must be a mapping, got a string 'just a string'",
        "z.yaml: line 9: entries[2].alpha: must be > 0, got -1",
        "z.yaml: line 10: entries[3]: missing required key 'name'",
        "z.yaml: line 10: entries[3].ranks: must be a list, got the number 4",
    ]
    # the parts that validated, for a feature's own checks
    assert checked.clean_mapping(("entries", 0)) == {"name": "ok"}
    assert checked.clean_value(("entries", 2, "name")) == "x" and checked.clean_value(("name",)) is None


VALID = TEXT.replace("  rank: 16\n", "  name: d\n").replace("ranks: 4", "ranks: [4]")


def test_valid_document_builds() -> None:
    demo = check(parse_yaml(VALID, "m.yaml"), Demo).result()
    assert demo.name == "demo" and demo.defaults == Entry(name="d", alpha=32.0)
    assert demo.entries == (Entry(name="a", ranks=(8, 16)), Entry(name="b", ranks=(4,)))


def test_feature_problems_join_in_line_order() -> None:
    checked = check(parse_yaml(VALID.replace("[4]", "[0]"), "m.yaml"), Demo)
    checked.add(("entries", 0, "name"), "'a' is taken")
    checked.add(("defaults",), "looks odd")
    assert [p.removeprefix("m.yaml: ") for p in checked.messages()] == [
        "line 2: defaults: looks odd",
        "line 6: entries[0].name: 'a' is taken",
        "line 9: entries[1].ranks[0]: must be >= 1, got 0",
    ]


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ManifestError, match="<top level>: must be a mapping, got a list"):
        check(parse_yaml("- 1\n- 2\n", "l.yaml"), Demo).result()
    with pytest.raises(ManifestError, match="<top level>: must be a mapping, got nothing"):
        check(parse_yaml("# nothing\n", "e.yaml"), Demo).result()


def test_a_key_without_value_is_absent() -> None:
    """``defaults:`` whose lines are all commented out is no defaults; a required key left empty is missing."""
    demo = check(parse_yaml("name: d\ndefaults:\n  # alpha: 2\nentries:\n  - name: a\n    alpha:\n", "n.yaml"), Demo)
    assert demo.result() == Demo(name="d", entries=(Entry(name="a"),))
    with pytest.raises(ManifestError, match="line 2: entries\\[0\\]: missing required key 'name'"):
        check(parse_yaml("entries:\n  - name:\n", "n.yaml"), Demo).result()


class Scalars(ManifestModel):
    s: str | None = None
    i: int | None = None
    f: float | None = None
    b: bool | None = None
    names: Seq[str] = ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s: 0755", 's: must be a string, got the number 493 — quote it: "0755"'),  # YAML 1.1 octal
        ("s: yes", 's: must be a string, got the boolean true — quote it: "yes"'),
        ("s: off", 's: must be a string, got the boolean false — quote it: "off"'),
        ("s: 1.10", 's: must be a string, got the number 1.1 — quote it: "1.10"'),
        ("s: 1_000", 's: must be a string, got the number 1000 — quote it: "1_000"'),
        ("s: 2024-01-01", 's: must be a string, got the date 2024-01-01 — quote it: "2024-01-01"'),
        ("s: [a]", "s: must be a string, got a list"),
        ("i: 4.0", "i: must be an integer, got the number 4.0"),
        ("i: yes", "i: must be an integer, got the boolean true"),
        ("i: '8'", "i: must be an integer, got a string '8'"),
        ("f: on", "f: must be a number, got the boolean true"),
        ("b: 'yes'", "b: must be true or false, got a string 'yes'"),
        ("b: 1", "b: must be true or false, got the number 1"),
        ("names: [a, 1.5]", 'names[1]: must be a string, got the number 1.5 — quote it: "1.5"'),
        ("names: a", "names: must be a list, got a string 'a'"),
    ],
)
def test_strict_types_never_coerce(text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as err:
        check(parse_yaml(f"# strict\n{text}\n", "s.yaml"), Scalars).result()
    assert err.value.problems() == [f"s.yaml: line 2: {expected}"]


def test_numbers_are_accepted_where_numbers_are_meant() -> None:
    got = check(parse_yaml("s: '0755'\ni: 0755\nf: 32\nb: false\nnames: ['1.5']\n", "n.yaml"), Scalars).result()
    assert got == Scalars(s="0755", i=493, f=32.0, b=False, names=("1.5",))


def test_names() -> None:
    assert name_problem("tenant-a.v2_x") is None
    for bad in ("", "-a", "a b", "a/b", "ä"):
        assert name_problem(bad) == f"{bad!r}: {NAME_RULE}"


def test_every_shipped_manifest_is_yaml_with_a_parser_test() -> None:
    """Each manifests/*.yaml is a zoo (tests/test_zoo_manifest.py) or serve (test_serving_manifest.py) one."""
    shipped = sorted((Path(__file__).resolve().parent.parent / "manifests").glob("*.y*ml"))
    assert shipped
    for path in shipped:
        assert path.name.startswith(("zoo", "serve")), f"{path.name}: add a parser test for this kind"
        assert isinstance(load_yaml(path).data, dict)

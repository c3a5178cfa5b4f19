"""The generic YAML manifest loader: line numbers per key path, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pissa.core.errors import ManifestError
from pissa.core.manifests import Problems, format_key_path, load_yaml, parse_yaml, validate

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


def test_readers_collect_every_problem_in_line_order() -> None:
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
"""
    doc = parse_yaml(text, "z.yaml")

    def build(problems: Problems) -> list[tuple[str, list[int]]]:
        root = problems.root()
        root.get_str("name", required=True)  # 3 is accepted as a string "3"
        root.get_int("rank", 16)
        out = []
        for entry in root.mappings("entries", non_empty=True):
            name = entry.get_str("name", required=True)
            ranks = entry.int_list("ranks", [16], minimum=1)
            entry.get_bool("private", False)
            entry.get_float("alpha", None, exclusive_minimum=0)
            entry.reject_unknown()
            out.append((name, ranks))
        root.reject_unknown()
        return out

    with pytest.raises(ManifestError) as err:
        validate(doc, build)
    assert err.value.problems() == [
        "z.yaml: line 2: rnak: unknown key (did you mean 'rank'?)",
        "z.yaml: line 5: entries[0].ranks[1]: must be >= 1, got 0",
        "z.yaml: line 5: entries[0].ranks[2]: repeats 8",
        "z.yaml: line 6: entries[0].private: must be true or false, got a string 'yes'",
        "z.yaml: line 7: entries[1]: must be a mapping, got a string",
        "z.yaml: line 9: entries[2].alpha: must be > 0, got -1",
    ]


def test_valid_document_builds() -> None:
    doc = parse_yaml(TEXT, "m.yaml")

    def build(problems: Problems) -> list[tuple[str, list[int]]]:
        root = problems.root()
        root.get_str("name")
        root.mapping("defaults")
        result = [(e.get_str("name"), e.int_list("ranks")) for e in root.mappings("entries")]
        root.reject_unknown()
        return result

    assert validate(doc, build) == [("a", [8, 16]), ("b", [4])]


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ManifestError, match="<top level>: must be a mapping, got a list"):
        validate(parse_yaml("- 1\n- 2\n", "l.yaml"), lambda p: p.root())


def test_every_shipped_manifest_is_yaml_with_a_parser_test() -> None:
    """Each manifests/*.yaml is a zoo (tests/test_zoo_manifest.py) or serve (test_serving_manifest.py) one."""
    shipped = sorted((Path(__file__).resolve().parent.parent / "manifests").glob("*.y*ml"))
    assert shipped
    for path in shipped:
        assert path.name.startswith(("zoo", "serve")), f"{path.name}: add a parser test for this kind"
        assert isinstance(load_yaml(path).data, dict)

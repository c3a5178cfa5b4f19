"""Serving manifests (every shipped one parses), flags, and the exact vLLM command (--dry-run)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from pissa.cli import run
from pissa.core.errors import InvalidOptionsError, ManifestError
from serving.command import build_command
from serving.manifest import (
    ModelRef,
    load_serve_manifest,
    manifest_from_flags,
    parse_size,
    resolve_manifest,
    resolve_ref,
)

MANIFESTS = sorted((Path(__file__).parent.parent / "manifests").glob("serve*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_shipped_manifests_parse(path):
    m = load_serve_manifest(path)
    assert m.base.served_name
    plan = build_command(m, 16, environ={})
    assert plan.argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server")


def test_shipped_manifests_exist():
    assert len(MANIFESTS) >= 2


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return p


def test_full_manifest_relative_paths(tmp_path, tiny_llama):
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    p = write(tmp_path, f"""
base:
  path: {tiny_llama}
  served_name: tiny
  aliases: [org/tiny]
adapters:
  - name: tenant-a
    path: adapters/a
  - name: tenant-b
    path: org/tenant-b
vllm:
  port: 8123
  dtype: float32
  max_loras: 2
  max_cpu_loras: 3
  kv_cache_memory_bytes: 64M
  api_key_env: MY_KEY
extra_args: [--enforce-eager]
""")
    m = load_serve_manifest(p)
    assert m.base.ref == ModelRef(str(Path(tiny_llama).resolve()), True)
    assert m.base.aliases == ("org/tiny",)
    a, b = m.adapters
    assert a.ref == ModelRef(str((tmp_path / "adapters" / "a").resolve()), True)
    assert b.ref == ModelRef("org/tenant-b", False)
    assert m.vllm.kv_cache_memory_bytes == 64 * 2**20 and m.vllm.port == 8123
    assert m.served_names == ("tiny", "tenant-a", "tenant-b")


def test_every_problem_with_its_line(tmp_path):
    p = write(tmp_path, """base:
  path: ./does-not-exist
adapters:
  - name: bad name!
    path: org/x
  - name: b
    path: org/y
  - name: b
    path: org/z
vllm:
  port: 70000
  dtype: float8
  max_loras: 4
  max_cpu_loras: 2
  kv_cache_memory_bytes: lots
  prot: 1
extra_args: ["--port=9000"]
""")
    with pytest.raises(ManifestError) as exc:
        load_serve_manifest(p)
    problems = exc.value.problems()
    text = "\n".join(problems)
    for fragment in ("line 2: base.path", "line 4: adapters[0].name", "line 11: vllm.port", "line 12: vllm.dtype",
                     "line 15: vllm.kv_cache_memory_bytes", "line 16: vllm.prot: unknown key (did you mean 'port'?)",
                     "line 8: adapters[2].name: adapter name 'b' is used twice (first on line 6)",
                     "line 14: vllm.max_cpu_loras: must be >= max_loras (4), got 2",
                     "line 17: extra_args[0]: --port is set by"):
        assert fragment in text, (fragment, text)
    assert len(problems) == 9, text


def test_missing_base_and_syntax_error(tmp_path):
    with pytest.raises(ManifestError, match="missing required key 'base'"):
        load_serve_manifest(write(tmp_path, "adapters: []\n"))
    with pytest.raises(ManifestError, match="line 3: YAML syntax error"):
        load_serve_manifest(write(tmp_path, "base:\n  path: [unclosed\n"))


@pytest.mark.parametrize(("text", "expected"), [("64M", 64 << 20), ("1G", 1 << 30), ("512KiB", 512 << 10),
                                                (4096, 4096), ("0", None), ("-1M", None), ("big", None)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_resolve_ref_rule(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert resolve_ref("org/local", tmp_path)[0] == ModelRef(str(tmp_path / "org" / "local"), True)
    assert resolve_ref("org/remote", tmp_path)[0] == ModelRef("org/remote", False)
    ref, problem = resolve_ref("./missing", tmp_path)
    assert ref is None and "neither an existing path" in problem


def test_flags(tmp_path, tiny_llama):
    m = manifest_from_flags(str(tiny_llama), [f"a={tiny_llama}", "b=org/b"], served_name="base")
    assert [a.name for a in m.adapters] == ["a", "b"]
    with pytest.raises(InvalidOptionsError) as exc:
        manifest_from_flags("./nope", ["novalue", "base=org/x", "x=org/y", "x=org/z"], served_name="base")
    text = "\n".join(exc.value.problems())
    assert "--base" in text and "expected NAME=PATH" in text and "is the base's served name" in text
    assert "'x' is used twice" in text


def test_resolve_manifest_overrides(tmp_path, tiny_llama):
    p = write(tmp_path, f"base:\n  path: {tiny_llama}\n  served_name: tiny\nvllm:\n  port: 8001\n")
    m = resolve_manifest(p, adapters=["extra=org/extra"], port=9001, kv_cache="32M")
    assert m.vllm.port == 9001 and m.vllm.kv_cache_memory_bytes == 32 << 20
    assert [a.name for a in m.adapters] == ["extra"]
    with pytest.raises(InvalidOptionsError, match="MANIFEST"):
        resolve_manifest(None)
    with pytest.raises(InvalidOptionsError) as exc:
        resolve_manifest(p, base="x", kv_cache="huge")
    assert len(exc.value.problems()) == 2


def test_command_and_api_key_env(tiny_llama):
    from serving.manifest import VllmSettings

    m = manifest_from_flags(str(tiny_llama), [f"a={tiny_llama}"], served_name="base",
                            settings=VllmSettings(api_key_env="K", host="0.0.0.0", port=8555))
    with pytest.raises(InvalidOptionsError, match="'K'"):
        build_command(m, 8, environ={})
    plan = build_command(m, 8, environ={"K": "secret"}, python="python")
    assert plan.env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": "secret"}
    assert "secret" not in " ".join(plan.argv) and "secret" not in plan.shell()
    assert plan.url == "http://127.0.0.1:8555"


# --- CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory, tiny_llama):
    from serving.testing import make_peft_adapter

    root = tmp_path_factory.mktemp("tenants")
    return [make_peft_adapter(tiny_llama, root / f"t{i}", seed=10 + i, rank=r) for i, r in ((0, 8), (1, 12))]


def test_dry_run_prints_the_exact_command(capsys, tiny_llama, two_tenants):
    t0, t1 = two_tenants
    code = run(["serve", "--base", str(tiny_llama), "--served-name", "tiny", "--adapter", f"t0={t0}",
                "--adapter", f"t1={t1}", "--dtype", "float32", "--kv-cache", "64M", "--port", "8765", "--dry-run"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    env, argv = out.split(" ", 1)
    assert env == "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
    expected = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(tiny_llama).resolve()),
                "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8765", "--dtype", "float32",
                "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",  # ranks 8 and 12 -> 16
                "--lora-modules", f"t0={t0.resolve()}", f"t1={t1.resolve()}",
                "--max-model-len", "auto",  # the given cache may not hold the model's whole context
                "--kv-cache-memory-bytes", str(64 << 20)]
    assert shlex.split(argv) == expected


def test_serve_refuses_bad_adapters_before_launch(capsys, tiny_llama, tiny_qwen2, two_tenants, tmp_path):
    """Wrong base and a PiSSA-init config: both reported, exit 2, nothing started (dry-run or not)."""
    import json
    import shutil

    from serving.testing import make_peft_adapter

    q = make_peft_adapter(tiny_qwen2, tmp_path / "q", seed=3)
    pissa = tmp_path / "pissa"
    shutil.copytree(two_tenants[0], pissa)
    cfg = json.loads((pissa / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (pissa / "adapter_config.json").write_text(json.dumps(cfg))
    code = run(["serve", "--base", str(tiny_llama), "--adapter", f"q={q}", "--adapter", f"p={pissa}",
                "--port", "8766"])
    err = capsys.readouterr().err
    assert code == 2
    assert "adapter 'q'" in err and "made for base" in err
    assert "adapter 'p'" in err and "pissa-style init" in err
    assert "2 problems" in err


def test_adapters_cli_unreachable_server(capsys):
    code = run(["adapters", "list", "--url", "http://127.0.0.1:9"])
    assert code == 1 and "cannot reach" in capsys.readouterr().err


def test_serve_without_vllm_says_how_to_install(capsys, tiny_llama, monkeypatch):
    """--dry-run works without vLLM; a real start says which extra to install (exit 1, one line)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert run(["serve", "--base", str(tiny_llama), "--dry-run"]) == 0
    capsys.readouterr()
    assert run(["serve", "--base", str(tiny_llama), "--port", "8767"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vllm is not installed" in err[0] and "pip install -e '.[serve-cpu]'" in err[0]


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        # silently coerced before
        ("  served_name: 1.10\n", 'line 3: base.served_name: must be a string, got the number 1.1 — quote it: "1.10"'),
        ("extra_args: [--max-num-seqs, 4]\n", 'line 3: extra_args[1]: must be a string, got the number 4 — quote it: "4"'),
        ("vllm:\n  api_key_env: 0755\n",
         'line 4: vllm.api_key_env: must be a string, got the number 493 — quote it: "0755"'),
        # refused before too, now with the value as YAML read it and how to write it
        ("adapters:\n  - name: on\n    path: org/a\n",
         'line 4: adapters[0].name: must be a string, got the boolean true — quote it: "on"'),
        ("vllm:\n  max_loras: 2.0\n", "line 4: vllm.max_loras: must be an integer, got the number 2.0"),
        ("vllm:\n  runtime_lora_updating: 'no'\n",
         "line 4: vllm.runtime_lora_updating: must be true or false, got a string 'no'"),
    ],
)
def test_yaml_values_are_never_coerced(tmp_path, tail, expected):
    p = write(tmp_path, "base:\n  path: org/base\n" + tail)
    with pytest.raises(ManifestError) as exc:
        load_serve_manifest(p)
    assert exc.value.problems() == [f"{p}: {expected}"]


def test_hub_ids_follow_the_hubs_rule(tmp_path):
    """Not a path and not a valid repo id for huggingface_hub ('--', '..', a trailing '.'): refused."""
    for value in ("org/a--b", "org/a..b", "org/a."):
        ref, problem = resolve_ref(value, tmp_path)
        assert ref is None and "nor a hub id" in problem, value


def test_flags_override_the_manifest_and_are_checked_with_it(tmp_path, tiny_llama):
    p = write(tmp_path, f"base:\n  path: {tiny_llama}\nvllm:\n  max_cpu_loras: 2\n")
    with pytest.raises(InvalidOptionsError) as exc:
        resolve_manifest(p, max_loras=4)
    assert exc.value.problems() == ["max_cpu_loras: must be >= max_loras (4), got 2"]


def test_empty_or_spaced_host_is_refused(tmp_path):
    # An empty host becomes `--host ''`: a server listening on every interface (found by a review, 2026-12-08).
    with pytest.raises(ManifestError) as exc:
        load_serve_manifest(write(tmp_path, 'base: {path: org/base}\nvllm: {host: ""}\n'))
    assert len(exc.value.problems()) == 1 and "line 2" in exc.value.problems()[0] and "every interface" in str(exc.value)
    with pytest.raises(ManifestError, match="holds spaces"):
        load_serve_manifest(write(tmp_path, "base: {path: org/base}\ngateway: {host: a b}\n"
                                            "tenants:\n  - name: acme\n    models: [org/base]\n"))
    for host in ("", "not a host"):
        with pytest.raises(InvalidOptionsError, match="--host"):
            resolve_manifest(None, base="org/base", host=host)


def test_log_file_in_a_missing_folder_is_refused(tiny_llama, tmp_path, capsys):
    code = run(["serve", "--base", str(tiny_llama), "--kv-cache", "64M", "--log-file", str(tmp_path / "no" / "log"),
                "--dry-run"])
    assert code == 2 and "its folder does not exist" in capsys.readouterr().err


def test_max_lora_rank_above_vllms_largest_is_a_manifest_error(tmp_path):
    # It was reported as an adapter problem without a line (a review, 2026-12-08).
    with pytest.raises(ManifestError) as exc:
        load_serve_manifest(write(tmp_path, "base: {path: org/base}\nvllm:\n  max_lora_rank: 9999\n"))
    assert exc.value.problems() == [f"{tmp_path / 'serve.yaml'}: line 3: vllm.max_lora_rank: must be <= 512, got 9999"]

"""The serving manifest's gateway: and tenants: sections, pissa tenants, and pissa serve --dry-run with tenants."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pissa.cli import cli, run
from pissa.core.errors import ManifestError
from serving.gateway import keys, store
from serving.manifest import load_serve_manifest, resolve_manifest

HEAD = """base:
  path: org/base
  served_name: base
adapters:
  - name: a1
    path: org/a1
  - name: b1
    path: org/b1
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(HEAD + text)
    return p


def test_tenants_resolve(tmp_path: Path) -> None:
    m = load_serve_manifest(write(tmp_path, """gateway: {host: 0.0.0.0, port: 9000, keys_file: k/keys, max_body_bytes: 2M}
tenants:
  - name: acme
    models: [a1, base]
    limits: {requests_per_minute: 120, max_concurrent: 8, max_tokens: 1024, tokens_per_day: 2000000}
  - name: beta
    models: [b1]
"""))
    gw = m.gateway
    assert gw is not None and (gw.host, gw.port, gw.max_body_bytes) == ("0.0.0.0", 9000, 2 * 2**20)
    assert gw.keys_file == tmp_path / "k" / "keys" and gw.usage_db == tmp_path / "usage.sqlite"
    assert [(t.name, t.models) for t in gw.tenants] == [("acme", ("a1", "base")), ("beta", ("b1",))]
    assert gw.tenants[0].limits.tokens_per_day == 2000000 and gw.tenants[1].limits.max_tokens is None


def test_no_tenants_is_todays_behaviour(tmp_path: Path) -> None:
    assert load_serve_manifest(write(tmp_path, "")).gateway is None


def test_every_tenant_problem_at_once_with_lines(tmp_path: Path) -> None:
    p = write(tmp_path, """vllm:
  port: 8001
tenants:
  - name: acme
    models: [a1, a2, a1]
    limits: {requests_per_minute: 0, max_tokens: -5, burst: 3}
  - name: acme
    models: [b1]
  - name: "bad name"
""")
    with pytest.raises(ManifestError) as exc:
        load_serve_manifest(p)
    text = "\n".join(exc.value.problems())
    assert "line 10: vllm.port: with tenants, vLLM listens on loopback" in text
    assert "line 13: tenants[0].models[1]: 'a2' is not a served model; served: a1, b1, base" in text
    assert "line 13: tenants[0].models[2]: 'a1' is listed twice" in text
    assert "line 14: tenants[0].limits.requests_per_minute: must be >= 1, got 0" in text
    assert "line 14: tenants[0].limits.max_tokens: must be >= 1, got -5" in text
    assert "line 14: tenants[0].limits.burst: unknown key" in text
    assert "line 15: tenants[1].name: tenant name 'acme' is used twice (first on line 12)" in text
    assert "line 17: tenants[2].name: 'bad name'" in text
    assert len(exc.value.problems()) == 8


def test_did_you_mean_for_a_misspelt_model(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"'bsae' is not a served model \(did you mean 'base'\?\)"):
        load_serve_manifest(write(tmp_path, "tenants:\n  - name: acme\n    models: [bsae]\n"))


def test_a_gateway_needs_tenants(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="a gateway needs a tenants: section"):
        load_serve_manifest(write(tmp_path, "gateway: {port: 9000}\n"))


def test_flags_host_and_port_move_the_gateway(tmp_path: Path) -> None:
    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    m = resolve_manifest(p, host="0.0.0.0", port=9100)
    assert m.gateway is not None and (m.gateway.host, m.gateway.port) == ("0.0.0.0", 9100)
    assert (m.vllm.host, m.vllm.port) == ("127.0.0.1", 8000)  # vLLM's own address is chosen at start


def test_dry_run_puts_vllm_on_loopback_behind_the_gateway(tmp_path: Path, tiny_llama: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(f"base:\n  path: {tiny_llama}\n  served_name: tiny\nvllm:\n  kv_cache_memory_bytes: 64M\n"
                 "gateway: {host: 0.0.0.0, port: 9123}\ntenants:\n  - name: acme\n    models: [tiny]\n")
    assert run(["serve", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    command = out.strip().splitlines()[-1]
    assert "--host 127.0.0.1" in command and "--port 9123" not in command and "VLLM_API_KEY='***'" in command
    assert "vLLM listens on loopback only" in out and "tenants: acme" in out


def test_tenants_cli(tmp_path: Path) -> None:
    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n  - name: beta\n    models: [b1]\n"
              "    limits: {max_tokens: 64}\n")
    runner = CliRunner()
    r = runner.invoke(cli, ["tenants", "add-key", str(p), "acme"])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip()
    assert keys.key_id(key) is not None and r.stdout == key + "\n"  # only the key on stdout
    assert "shown once" in r.stderr
    keys_file = tmp_path / "tenants.keys"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert key not in keys_file.read_text() and keys.hash_key(key) in keys_file.read_text()
    r2 = runner.invoke(cli, ["tenants", "add-key", str(p), "beta"])
    listing = runner.invoke(cli, ["tenants", "list", str(p)])
    assert listing.exit_code == 0
    assert key not in listing.output and r2.stdout.strip() not in listing.output
    assert f"key {keys.key_id(key)}" in listing.output and "max_tokens=64" in listing.output
    r = runner.invoke(cli, ["tenants", "revoke", str(p), str(keys.key_id(key))])
    assert r.exit_code == 0 and f"revoked key {keys.key_id(key)} of tenant acme" in r.output
    assert [k.tenant for k in keys.read_keys(keys_file)] == ["beta"]
    assert run(["tenants", "revoke", str(p), "deadbeef"]) == 2
    assert run(["tenants", "add-key", str(p), "acmee"]) == 2


def test_tenants_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    assert run(["tenants", "add-key", str(p), "acmee"]) == 2
    assert "did you mean 'acme'?" in capsys.readouterr().err
    plain = write(tmp_path, "")
    assert run(["tenants", "list", str(plain)]) == 2
    assert "has no tenants: section" in capsys.readouterr().err
    assert run(["tenants", "usage", str(p), "--since", "yesterday"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    (tmp_path / "tenants.keys").write_text("{broken")
    assert run(["tenants", "list", str(p)]) != 0
    assert (tmp_path / "tenants.keys").read_text() == "{broken"  # nothing of the user's replaced


def test_usage_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    w = store.UsageWriter(tmp_path / "usage.sqlite")
    w.add("acme", "a1", 10, 5)
    w.add("acme", "a1", 1, 2)
    w.close()
    assert run(["tenants", "usage", str(p), "--since", "2000-01-01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["day", "tenant", "model", "requests", "prompt", "completion", "total"]
    assert lines[1].split()[1:] == ["acme", "a1", "2", "11", "7", "18"]
    assert run(["tenants", "usage", str(p), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_keys_file_is_private_from_its_creation(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys.add_key(tmp_path / "k.keys", "acme")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.keys").stat().st_mode) == 0o600


def test_pissa_help_stays_light() -> None:
    import subprocess

    code = ("import sys, pissa.cli; pissa.cli.run(['tenants', '--help']); "
            "print(sorted(m for m in ('torch', 'vllm', 'starlette', 'httpx', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


# --- bad input found by a review (2026-12-08): each failed before its fix ------------------------------------------
def test_keys_file_of_another_version_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    newer = '{"version": 2, "owner": "ops", "keys": []}\n'
    (tmp_path / "tenants.keys").write_text(newer)
    assert run(["tenants", "add-key", str(p), "acme"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "format version 2" in err[0], err
    assert (tmp_path / "tenants.keys").read_text() == newer  # not rewritten as version 1 without its fields


def test_fields_this_version_does_not_use_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "k.keys"
    path.write_text('{"version": 1, "owner": "ops", "keys": [{"id": "0000abcd", "tenant": "acme", "sha256": "00", '
                    '"created": "2026-01-01T00:00:00Z", "note": "prod laptop"}]}')
    _, record = keys.add_key(path, "acme")
    body = __import__("json").loads(path.read_text())
    assert body["owner"] == "ops" and body["keys"][0]["note"] == "prod laptop" and len(body["keys"]) == 2
    keys.revoke_key(path, record.id)
    assert __import__("json").loads(path.read_text())["keys"][0]["note"] == "prod laptop"


def test_a_key_that_cannot_be_shown_is_removed_again(tmp_path: Path) -> None:
    import subprocess

    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "pissa", "tenants", "add-key", str(p), "acme"], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(err) == 1 and "removed again" in err[0], err
    assert keys.read_keys(tmp_path / "tenants.keys") == []  # no live key that nobody saw


@pytest.mark.parametrize("content", [b"garbage\n", None])
def test_an_unusable_usage_database_is_one_line(tmp_path: Path, content: bytes | None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    db = tmp_path / "usage.sqlite"
    if content is None:
        db.mkdir()
    else:
        db.write_bytes(content)
    expected = f"usage database {db} is unusable" if content is not None else f"{db} is a folder"
    for command in (["tenants", "usage", str(p)], ["tenants", "list", str(p)]):
        assert run(command) in (1, 2)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and expected in err[0] and "internal error" not in err[0], err
    if content is not None:
        assert db.read_bytes() == content


def test_gateway_files_must_be_distinct_files(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    cases = {"keys_file: usage.sqlite": "is the same file as gateway.keys_file",
             "keys_file: serve.yaml": "is this manifest itself",
             "keys_file: adir": "is a folder",
             'keys_file: ""': "is empty",
             "access_log: tenants.keys": "is the same file as gateway.keys_file"}
    for setting, message in cases.items():
        p = write(tmp_path, f"gateway: {{{setting}}}\ntenants:\n  - name: acme\n    models: [a1]\n")
        with pytest.raises(ManifestError) as exc:
            load_serve_manifest(p)
        assert len(exc.value.problems()) == 1 and message in exc.value.problems()[0], (setting, exc.value.problems())
        assert "line 9" in exc.value.problems()[0]  # the gateway: line, after HEAD


def test_keys_file_without_a_version_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "k.keys").write_text('{"keys": []}')
    with pytest.raises(Exception, match="is not a pissa keys file"):
        keys.read_keys(tmp_path / "k.keys")


def test_empty_access_log_means_the_log(tmp_path: Path) -> None:
    gw = load_serve_manifest(write(tmp_path, 'gateway: {access_log: ""}\ntenants:\n  - name: acme\n    models: [a1]\n')).gateway
    assert gw is not None and gw.access_log is None


def test_unwritable_keys_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    p = write(tmp_path, "gateway: {keys_file: afile/tenants.keys}\ntenants:\n  - name: acme\n    models: [a1]\n")
    assert run(["tenants", "add-key", str(p), "acme"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot write the keys file" in err[0] and "internal error" not in err[0], err


def test_dry_run_refuses_a_broken_keys_file(tiny_llama: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # The gateway would start with no keys at all (it only warns); refuse before starting instead.
    p = tmp_path / "serve.yaml"
    p.write_text(f"base:\n  path: {tiny_llama}\n  served_name: tiny\nvllm:\n  kv_cache_memory_bytes: 64M\n"
                 "tenants:\n  - name: acme\n    models: [tiny]\n")
    keys.add_key(tmp_path / "tenants.keys", "acme")
    whole = (tmp_path / "tenants.keys").read_text()
    (tmp_path / "tenants.keys").write_text(whole[:40])
    assert run(["serve", str(p), "--dry-run"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "INFO" not in line]
    assert len(err) == 1 and "tenants.keys is not valid JSON" in err[0], err
    (tmp_path / "tenants.keys").write_text(whole)
    assert run(["serve", str(p), "--dry-run"]) == 0


def test_a_stored_runtime_name_vllm_cannot_take_is_not_served_again(tmp_path: Path) -> None:
    # Recorded before the gateway checked names, it would have broken every restart (vLLM's --lora-modules).
    from serving.gateway.run import upstream_manifest

    p = write(tmp_path, "tenants:\n  - name: acme\n    models: [a1]\n")
    m = load_serve_manifest(p)
    assert m.gateway is not None
    (tmp_path / "ad").mkdir()
    store.record_runtime_adapter(m.gateway.usage_db, "x=y", str(tmp_path / "ad"), ["acme"])
    store.record_runtime_adapter(m.gateway.usage_db, "fine", str(tmp_path / "ad"), ["acme"])
    names = [a.name for a in upstream_manifest(m, port=8123).adapters]
    assert "fine" in names and "x=y" not in names

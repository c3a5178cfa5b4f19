"""Push and pull end to end: the real huggingface_hub client against the local Hub stand-in.

Every test starts its own stand-in (``hub`` fixture, conftest.py) on 127.0.0.1; nothing leaves the
machine. The bundle is a real ``pissa convert`` output of the tiny Llama, verified by the real
``verify_bundle``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from converter.push import check_adapter_folder, push
from pissa.cli import run
from pissa.core.errors import HubError, SourceNotFoundError, VerificationError
from pissa.core.hub import checkpoint_files, download_checkpoint, download_repo, hub_error

LFS_PUT = r"^/lfs-upload/"
COMMIT = r"/commit/"


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones excluded), by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


@pytest.fixture
def bundle(tiny_llama_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny Llama bundle (tests may damage it)."""
    return Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))


def test_push_pull_bit_identical_and_rerun_uploads_nothing(hub, bundle: Path, tmp_path: Path) -> None:
    report = push(bundle, "alice/tiny-pissa", message="first")
    local = _tree(bundle)
    n_weights = sum(1 for f in local if f.endswith(".safetensors"))
    assert report.kind == "bundle" and report.unchanged == ()
    assert set(report.uploaded) == set(local)
    # the repo was created and every safetensors file went through the LFS batch + PUT route
    assert hub.count("POST", r"^/api/repos/create$") == 1
    assert hub.count("PUT", LFS_PUT) == n_weights >= 2
    assert hub.count("POST", COMMIT) == 1
    remote = hub.head_files("alice/tiny-pissa")
    assert {p for p, b in hub.repos["alice/tiny-pissa"].resolve("main").files.items() if b.lfs} == {
        f for f in local if f.endswith(".safetensors")
    }
    head = hub.repos["alice/tiny-pissa"].refs["main"]

    # a re-run sends nothing: no LFS upload, no commit, same head
    again = push(bundle, "alice/tiny-pissa")
    assert again.uploaded == () and set(again.unchanged) == set(local)
    assert hub.count("PUT", LFS_PUT) == n_weights and hub.count("POST", COMMIT) == 1
    assert hub.repos["alice/tiny-pissa"].refs["main"] == head == again.commit_oid

    # the download is bit-identical to the bundle and still verifies
    folder = download_repo("alice/tiny-pissa", cache_dir=tmp_path / "cache")
    assert _tree(folder) == local
    assert {p: hashlib.sha256(d).hexdigest() for p, d in remote.items() if p != ".gitattributes"} == local
    from converter.verify import verify_bundle

    assert not verify_bundle(folder).problems


def test_push_card_regenerated_from_record(hub, bundle: Path) -> None:
    """The published README is the card rendered from pissa.json, not the (edited) local file."""
    (bundle / "README.md").write_text("hand-edited card\n")
    calls = []

    def card(record: dict, *, repo_id: str | None = None) -> str:
        calls.append(record["format"])
        return "---\nlibrary_name: peft\n---\nregenerated\n"

    push(bundle, "alice/card", card_renderer=card, verifier=lambda p: None)
    assert calls == ["pissa-bundle"]
    assert hub.head_files("alice/card")["README.md"] == b"---\nlibrary_name: peft\n---\nregenerated\n"


def test_broken_bundle_is_never_pushed(hub, bundle: Path) -> None:
    shard = next(bundle.glob("model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        push(bundle, "alice/broken")
    assert hub.requests == []


def test_commit_500_reports_failure_then_rerun_resumes(hub, bundle: Path) -> None:
    hub.fail("POST", COMMIT, 500)
    with pytest.raises(HubError) as err:
        push(bundle, "alice/flaky")
    assert err.value.status == 500 and "HTTP 500" in str(err.value) and "re-running resumes" in str(err.value)
    # nothing half-pushed: main still holds only the initial commit's files
    assert set(hub.head_files("alice/flaky")) == {".gitattributes"}
    puts = hub.count("PUT", LFS_PUT)
    assert puts >= 2

    report = push(bundle, "alice/flaky")
    assert set(report.uploaded) == set(_tree(bundle))
    assert hub.count("PUT", LFS_PUT) == puts, "LFS objects uploaded before the failure were sent again"
    assert set(hub.head_files("alice/flaky")) - {".gitattributes"} == set(_tree(bundle))


def test_cli_401_bad_token(hub, bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code = run(["push", str(bundle), "alice/x"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "authentication failed (HTTP 401)" in err and "HF_TOKEN" in err
    assert hub.repos == {}


def test_cli_403_foreign_namespace(hub, bundle: Path, capsys) -> None:
    code = run(["push", str(bundle), "bob/x"])
    err = capsys.readouterr().err
    assert code == 1 and "permission denied on bob/x (HTTP 403)" in err and "'bob' namespace" in err
    assert hub.repos == {}


def test_network_failure(monkeypatch: pytest.MonkeyPatch, bundle: Path, tmp_path: Path) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="cannot reach the Hub"):
        push(bundle, "alice/x", verifier=lambda p: None)
    with pytest.raises(HubError, match="cannot reach the Hub"):
        download_checkpoint("alice/x", None, cache_dir=tmp_path / "cache")


def test_missing_repo_and_revision(hub, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"repository alice/nope not found") as err:
        download_checkpoint("alice/nope", None, cache_dir=tmp_path)
    assert err.value.status == 404
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint, token="hf_alice").create_repo("alice/there")
    with pytest.raises(HubError, match=r"revision 'nope' does not exist in alice/there"):
        download_repo("alice/there", "nope", cache_dir=tmp_path)


def test_adapter_push_to_branch_and_pr(hub, tmp_path: Path, tiny_llama_bundle: Path) -> None:
    adapter = Path(shutil.copytree(tiny_llama_bundle / "pissa_init", tmp_path / "adapter"))
    assert check_adapter_folder(adapter) == []
    report = push(adapter, "alice/adapter", revision="dev", private=True)
    assert report.kind == "adapter" and report.revision == "dev"
    repo = hub.repos["alice/adapter"]
    assert repo.private and set(hub.head_files("alice/adapter", "dev")) >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert set(hub.head_files("alice/adapter", "main")) == {".gitattributes"}

    (adapter / "notes.txt").write_text("v2\n")
    pr = push(adapter, "alice/adapter", revision="dev", create_pr=True)
    assert pr.pr_url and pr.pr_url.endswith("/discussions/1") and pr.uploaded == ("notes.txt",)
    assert "notes.txt" not in hub.head_files("alice/adapter", "dev")
    assert "notes.txt" in hub.head_files("alice/adapter", "refs/pr/1")


def test_broken_adapter_refused(hub, tmp_path: Path, tiny_llama_bundle: Path) -> None:
    adapter = Path(shutil.copytree(tiny_llama_bundle / "pissa_init", tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(VerificationError) as err:
        push(adapter, "alice/a")
    problems = err.value.problems()
    assert any("peft_type is 'IA3'" in p for p in problems) and any("unreadable" in p for p in problems)
    assert hub.requests == []


def test_download_checkpoint_fetches_only_what_convert_reads(
    hub, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model repo with extra formats: only config/tokenizer/safetensors come down; convert works."""
    from huggingface_hub import HfApi, constants

    src = Path(shutil.copytree(tiny_llama, tmp_path / "src"))
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"\0" * 100)
    (src / "flax_model.msgpack").write_bytes(b"\0" * 100)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    api = HfApi(endpoint=hub.endpoint, token="hf_alice")
    api.create_repo("alice/tiny-llama")
    api.upload_folder(repo_id="alice/tiny-llama", folder_path=str(src))

    folder = download_checkpoint("alice/tiny-llama", None, cache_dir=tmp_path / "cache")
    got = _tree(folder)
    assert "onnx/model.onnx" not in got and "flax_model.msgpack" not in got
    assert got == {k: v for k, v in _tree(src).items() if k not in ("onnx/model.onnx", "flax_model.msgpack")}

    # offline (or the Hub down): the cached snapshot is used, without any request
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert download_checkpoint("alice/tiny-llama", None, cache_dir=tmp_path / "cache") == folder
    assert len(hub.requests) == before


def test_convert_from_hub_id(hub, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pissa convert hub:ORG/NAME`` downloads through the same client and records the repo id."""
    from huggingface_hub import HfApi

    from converter.convert import convert
    from converter.options import ConvertOptions

    api = HfApi(endpoint=hub.endpoint, token="hf_alice")
    api.create_repo("alice/tl")
    api.upload_folder(repo_id="alice/tl", folder_path=str(tiny_llama))
    report = convert("hub:alice/tl", tmp_path / "b", ConvertOptions(rank=4), progress=False)
    record = json.loads((report.out / "pissa.json").read_text())
    assert record["source"]["kind"] == "hub" and record["source"].get("repo_id") == "alice/tl"


def test_checkpoint_files_choice() -> None:
    meta = ["config.json", "tokenizer.json", "README.md", "generation_config.json"]
    st = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    both = meta + st + ["pytorch_model.bin", "onnx/model.onnx", "tf_model.h5", "sub/model.safetensors"]
    assert checkpoint_files(both) == sorted(meta + st)
    assert checkpoint_files(meta + ["pytorch_model.bin"]) == sorted(meta + ["pytorch_model.bin"])
    assert checkpoint_files(["m.Q4_0.gguf", "README.md"]) == ["README.md", "m.Q4_0.gguf"]
    with pytest.raises(SourceNotFoundError, match="2 GGUF files"):
        checkpoint_files(["a.gguf", "b.gguf"], repo_id="o/n")
    assert checkpoint_files(["a.gguf", "b.gguf"], filename="b.gguf") == ["b.gguf"]
    with pytest.raises(SourceNotFoundError, match="no weights"):
        checkpoint_files(meta, repo_id="o/n")


def test_hub_error_passthrough_of_unknown_errors() -> None:
    with pytest.raises(KeyError):
        raise hub_error(KeyError("x"), repo_id="o/n", action="testing", endpoint="http://x")


def test_cli_push_output_and_rerun(hub, bundle: Path, capsys) -> None:
    assert run(["push", str(bundle), "alice/cli", "--private", "-m", "via the CLI"]) == 0
    out = capsys.readouterr().out
    assert f"pushed bundle {bundle} to alice/cli@main: {len(_tree(bundle))} files" in out and "commit: " in out
    assert hub.repos["alice/cli"].private
    assert hub.repos["alice/cli"].resolve("main").message == "via the CLI"
    assert run(["push", str(bundle), "alice/cli"]) == 0
    assert f"alice/cli@main is up to date: all {len(_tree(bundle))} files unchanged" in capsys.readouterr().out


def test_offline_without_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode is on .* not in the cache") as err:
        download_checkpoint("org/never-downloaded", None, cache_dir=tmp_path)
    assert "unset HF_HUB_OFFLINE" in str(err.value)


def test_push_offline_and_push_of_a_run_say_what_to_do(monkeypatch: pytest.MonkeyPatch, bundle: Path,
                                                        tmp_path: Path) -> None:
    # A push offline was told "unset HF_HUB_OFFLINE to download it"; a run folder got no hint to export it
    # (a review, 2026-12-08).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="pushing needs the Hub") as err:
        push(bundle, "alice/offline")
    assert err.value.fix == "unset HF_HUB_OFFLINE to push"
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "run.json").write_text("{}")
    with pytest.raises(VerificationError, match="is a training run") as verr:
        push(runs, "alice/run")
    assert "pissa export" in (verr.value.fix or "")


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "alice/a--b", "alice/x.", "alice/-x"])
def test_invalid_repo_id_rejected_before_any_request(hub, bundle: Path, repo_id: str) -> None:
    """huggingface_hub's own rule (validate_repo_id): e.g. no ``--`` and no trailing ``.``."""
    with pytest.raises(HubError, match="not of the form ORG/NAME|not a valid Hub repo id") as err:
        push(bundle, repo_id, verifier=lambda p: None)
    assert err.value.repo_id == repo_id
    assert hub.requests == []


@pytest.mark.parametrize("source", ["alice/a--b", "alice/x."])
def test_source_that_is_no_valid_repo_id_is_a_missing_path(hub, source: str) -> None:
    """A source that is neither a path nor a valid repo id is reported missing, without a Hub request."""
    from converter.sources import resolve_source

    with pytest.raises(SourceNotFoundError, match=f"{re.escape(source)} does not exist"):
        resolve_source(source)
    assert hub.requests == []


def test_push_real_exports_adapter_and_merged(hub, tmp_path: Path, tiny_llama_bundle: Path) -> None:
    """Outputs of ``pissa export`` (LoRA adapter and --merge model) verify, push and come back identical."""
    from test_export import fake_training

    from converter.export import export

    trained, _ = fake_training(tiny_llama_bundle, tmp_path)
    export(trained, tmp_path / "lora")
    export(trained, tmp_path / "merged", merge=True)
    for name, kind in (("lora", "adapter"), ("merged", "merged")):
        report = push(tmp_path / name, f"alice/{name}")
        assert report.kind == kind and set(report.uploaded) == set(_tree(tmp_path / name))
        assert _tree(download_repo(f"alice/{name}")) == _tree(tmp_path / name)

    merged = tmp_path / "merged"
    shard = next(merged.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(VerificationError) as err:
        push(merged, "alice/merged-2")
    assert any("sha256 differs from pissa_export.json" in p for p in err.value.problems())
    assert "alice/merged-2" not in hub.repos


@pytest.mark.parametrize(
    ("status", "kind", "expected", "fix"),
    [
        (502, "http", "the Hub failed with HTTP 502: bad gateway", "re-running resumes"),
        (401, "gated", "o/n is gated and this account has not been granted access (HTTP 401)", "accept the conditions"),
        (409, "http", "the Hub refused the request (HTTP 409): bad gateway", "PISSA_DEBUG=1"),
    ],
)
def test_hub_error_formatter(status: int, kind: str, expected: str, fix: str) -> None:
    """Each kind of client error becomes one line naming what failed and what to do."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    request = httpx2.Request("GET", "http://hub.test/api/models/o/n")
    response = httpx2.Response(status, request=request, headers={"X-Error-Message": "bad gateway"})
    exc = (GatedRepoError if kind == "gated" else HfHubHTTPError)("boom", response=response)
    err = hub_error(exc, repo_id="o/n", action="testing", endpoint="http://hub.test")
    assert isinstance(err, HubError) and err.status == status and err.repo_id == "o/n"
    assert str(err).startswith(f"testing (http://hub.test): {expected}") and fix in (err.fix or "")


def test_push_compares_content_not_size(hub, tmp_path: Path, tiny_llama_bundle: Path) -> None:
    """A file changed to the same size is sent again; only it; identical files are never re-sent."""
    adapter = Path(shutil.copytree(tiny_llama_bundle / "pissa_init", tmp_path / "adapter"))
    (adapter / "notes.txt").write_text("version 1\n")
    first = push(adapter, "alice/same-size")
    assert set(first.uploaded) == set(_tree(adapter))
    (adapter / "notes.txt").write_text("version 2\n")
    second = push(adapter, "alice/same-size")
    assert second.uploaded == ("notes.txt",) and set(second.unchanged) == set(_tree(adapter)) - {"notes.txt"}
    assert hub.head_files("alice/same-size")["notes.txt"] == b"version 2\n"
    third = push(adapter, "alice/same-size")
    assert third.uploaded == () and third.commit_oid == hub.repos["alice/same-size"].refs["main"]
    assert hub.count("POST", COMMIT) == 2 and hub.count("POST", r"/paths-info/main$") == 3


# --- GGUF sources on the Hub ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (tests/tiny.py) as an F32 GGUF file, with the HF folder it was written from."""
    from tiny import make_tiny_model
    from tiny_gguf import write_tiny_llama_gguf

    root = tmp_path_factory.mktemp("tiny-gguf")
    hf = make_tiny_model(root / "hf", "llama")
    (root / "gguf").mkdir()
    return write_tiny_llama_gguf(hf, root / "gguf" / "tiny-llama.F32.gguf")


def _gguf_repo(hub, repo_id: str, files: dict[str, Path | bytes]) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token="hf_alice")
    api.create_repo(repo_id)
    for name, content in files.items():
        api.upload_file(path_or_fileobj=content if isinstance(content, bytes) else str(content),
                        path_in_repo=name, repo_id=repo_id)


def _assert_dequantized_tiny_llama(folder: Path, tiny_gguf: Path) -> None:
    """The cached folder holds the tiny Llama's exact weights (F32 GGUF: dequantizing is lossless)."""
    from safetensors.torch import load_file

    got = load_file(str(folder / "model.safetensors"))
    want = load_file(str(tiny_gguf.parent.parent / "hf" / "model.safetensors"))
    assert set(want) <= set(got)
    for key, tensor in want.items():
        assert torch_equal(got[key], tensor), key


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_convert_hub_gguf_file(hub, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hub:ORG/NAME/FILE.gguf`` downloads that one file and converts it as the local file would be."""
    from converter.sources import materialize_gguf, resolve_source
    from pissa.core.hashing import sha256_file

    monkeypatch.setenv("PISSA_CACHE", str(tmp_path / "pissa-cache"))
    _gguf_repo(hub, "alice/tiny-gguf", {
        "tiny-llama.F32.gguf": tiny_gguf,
        "tiny-llama.other.gguf": b"GGUF but never downloaded",
        "README.md": b"---\nlicense: apache-2.0\n---\n",
    })
    source = resolve_source("hub:alice/tiny-gguf/tiny-llama.F32.gguf")
    assert source.kind == "gguf"
    assert hub.count("GET", r"/resolve/[^/]+/tiny-llama\.F32\.gguf$") == 1
    assert hub.count("GET", r"/resolve/[^/]+/tiny-llama\.other\.gguf$") == 0
    # the same cached float32 folder as the local file (keyed by content), with the exact weights
    assert source.folder == materialize_gguf(tiny_gguf).folder
    assert source.record["gguf_sha256"] == sha256_file(tiny_gguf)
    assert source.record["repo_id"] == "alice/tiny-gguf" and source.record["file"] == "tiny-llama.F32.gguf"
    assert source.record["commit"] == hub.repos["alice/tiny-gguf"].refs["main"]
    _assert_dequantized_tiny_llama(source.folder, tiny_gguf)

    assert run(["convert", "hub:alice/tiny-gguf/tiny-llama.F32.gguf", str(tmp_path / "b"), "--rank", "4"]) == 0
    record = json.loads((tmp_path / "b" / "pissa.json").read_text())
    assert record["source"]["kind"] == "gguf" and record["source"]["repo_id"] == "alice/tiny-gguf"
    from converter.verify import verify_bundle

    assert not verify_bundle(tmp_path / "b").problems


def test_convert_hub_repo_with_one_gguf(hub, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hub:ORG/NAME`` whose only weights are one .gguf: downloaded, dequantized, converted."""
    from converter.convert import convert
    from converter.options import ConvertOptions

    monkeypatch.setenv("PISSA_CACHE", str(tmp_path / "pissa-cache"))
    _gguf_repo(hub, "alice/one-gguf", {"model.gguf": tiny_gguf, "README.md": b"# tiny\n"})
    report = convert("hub:alice/one-gguf", tmp_path / "b", ConvertOptions(rank=4), progress=False)
    record = json.loads((report.out / "pissa.json").read_text())
    assert record["source"]["kind"] == "gguf"
    assert record["source"]["repo_id"] == "alice/one-gguf" and record["source"]["file"] == "model.gguf"
    _assert_dequantized_tiny_llama(Path(record["base_model"]), tiny_gguf)


def test_hub_gguf_source_errors(hub, tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    """Several GGUF files and none named, a missing file, a non-GGUF path: one line each, nothing written."""
    _gguf_repo(hub, "alice/two", {"a.gguf": tiny_gguf, "b.gguf": tiny_gguf})
    capsys.readouterr()  # the upload's progress bars
    cases = [
        ("hub:alice/two", "alice/two holds 2 GGUF files", "name the one to convert: hub:alice/two/FILE.gguf"),
        ("hub:alice/two/c.gguf", "alice/two has no file 'c.gguf'", "pick one of: a.gguf, b.gguf"),
        ("hub:alice/two/model.safetensors", "only a .gguf file of a repo can be named", "hub:alice/two/FILE.gguf"),
        ("hub:alice/two--x/a.gguf", "not a valid Hub repo id", "hub:ORG/NAME/FILE.gguf"),
    ]
    for source, message, fix in cases:
        assert run(["convert", source, str(tmp_path / "out")]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and fix in err, err
        assert not (tmp_path / "out").exists()


def test_cache_fallback_failure_is_not_disguised_as_network_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only "not in the cache" means "report the network problem"; any other failure surfaces as itself."""
    import huggingface_hub
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="cannot reach the Hub"):  # not cached: the network problem
        download_checkpoint("alice/x", None, cache_dir=tmp_path / "cache")

    def broken(*args, **kwargs):
        raise RuntimeError("cache listing failed")

    monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree", broken)
    with pytest.raises(RuntimeError, match="cache listing failed"):
        download_checkpoint("alice/x", None, cache_dir=tmp_path / "cache")

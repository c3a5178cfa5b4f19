"""Runtime adapter client against a stand-in OpenAI/vLLM server on loopback (no vLLM needed).

The stand-in speaks the three endpoints the client calls, requires a bearer key, and answers like
vLLM 0.32 does (400 with ``{"error": {"message"}}`` for a duplicate, 404 for an unknown adapter).
The real server is exercised in tests/test_vllm_server.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pissa.cli import run
from pissa.core.errors import (
    AdapterValidationError,
    InvalidOptionsError,
    MissingDependencyError,
    ServingError,
)
from serving.client import add_adapter, list_models, remove_adapter

KEY = "s3cret"


@pytest.fixture()
def standin(tiny_llama):
    state = {"adapters": {}, "loads": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self):
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            data = [{"id": "base", "root": str(tiny_llama), "parent": None}]
            data += [{"id": n, "root": p, "parent": "base"} for n, p in state["adapters"].items()]
            self._send(200, {"object": "list", "data": data})

        def do_POST(self):
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body["lora_name"]
            if self.path == "/v1/load_lora_adapter":
                state["loads"].append(body)
                if name in state["adapters"]:
                    self._send(400, {"error": {"message": f"The lora adapter '{name}' has already been loaded."}})
                    return
                state["adapters"][name] = body["lora_path"]
                self._send(200, {})
            elif self.path == "/v1/unload_lora_adapter":
                if name not in state["adapters"]:
                    self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}})
                    return
                del state["adapters"][name]
                self._send(200, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama, tiny_qwen2):
    from serving.testing import make_peft_adapter

    root = tmp_path_factory.mktemp("client-adapters")
    return {"good": make_peft_adapter(tiny_llama, root / "good", seed=1),
            "other": make_peft_adapter(tiny_qwen2, root / "other", seed=2)}


def test_add_list_remove_with_api_key(standin, adapters):
    url, state = standin
    report = add_adapter(url, "t1", adapters["good"], api_key=KEY)
    assert report is not None and report.ranks == {"t1": 8}
    assert state["loads"] == [{"lora_name": "t1", "lora_path": str(adapters["good"].resolve())}]
    models = list_models(url, api_key=KEY)
    assert [(m.name, m.is_adapter) for m in models] == [("base", False), ("t1", True)]
    remove_adapter(url, "t1", api_key=KEY)
    assert [m.name for m in list_models(url, api_key=KEY)] == ["base"]


def test_wrong_key_is_a_clean_error(standin):
    url, _ = standin
    with pytest.raises(ServingError, match="HTTP 401"):
        list_models(url, api_key="wrong")


def test_refused_before_sending(standin, adapters):
    """Another base's adapter never reaches the server."""
    url, state = standin
    with pytest.raises(AdapterValidationError, match="made for base"):
        add_adapter(url, "x", adapters["other"], api_key=KEY)
    assert state["loads"] == []


def test_alias_makes_the_pairing_explicit(standin, adapters, tmp_path):
    """An adapter recording a hub id of which the served folder is a copy: refused, unless aliased."""
    import shutil

    url, _ = standin
    copy = tmp_path / "aliased"
    shutil.copytree(adapters["good"], copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/tiny-llama"
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterValidationError, match="org/tiny-llama"):
        add_adapter(url, "a", copy, api_key=KEY)
    add_adapter(url, "a", copy, api_key=KEY, aliases=["org/tiny-llama"])


def test_server_refusal_message_surfaces(standin, adapters):
    url, _ = standin
    add_adapter(url, "dup", adapters["good"], api_key=KEY)
    with pytest.raises(ServingError, match="HTTP 400\\): The lora adapter 'dup' has already been loaded"):
        add_adapter(url, "dup", adapters["good"], api_key=KEY, validate=False)
    with pytest.raises(ServingError, match="HTTP 404\\): The lora adapter 'nope' cannot be found"):
        remove_adapter(url, "nope", api_key=KEY)


def test_cli(standin, adapters, monkeypatch, capsys):
    url, _ = standin
    monkeypatch.setenv("MY_KEY", KEY)
    assert run(["adapters", "add", "c1", str(adapters["good"]), "--url", url, "--api-key-env", "MY_KEY"]) == 0
    assert run(["adapters", "list", "--url", url, "--api-key-env", "MY_KEY"]) == 0
    out = capsys.readouterr().out
    assert "added c1 (rank 8)" in out and "adapter  c1" in out
    assert run(["adapters", "add", "c2", "/no/such/adapter", "--url", url, "--api-key-env", "MY_KEY"]) == 1
    assert "adapter path /no/such/adapter does not exist" in capsys.readouterr().err
    assert run(["adapters", "remove", "c1", "--url", url, "--api-key-env", "MY_KEY"]) == 0
    assert "removed c1" in capsys.readouterr().out


def test_session_without_vllm(monkeypatch, tiny_llama):
    import importlib.util

    from serving.session import serve_and_ask, vllm_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert not vllm_available()
    with pytest.raises(MissingDependencyError) as exc:
        serve_and_ask(tiny_llama, {}, ["hi"])
    assert "serve-cpu" in exc.value.fix


# --- bad --url and --api-key-env (found by a review, 2026-12-08: internal errors, a password echoed) --------------
@pytest.mark.parametrize("url, message", [
    ("", "needs http:// or https://"),
    ("127.0.0.1:9", "needs http:// or https://"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:9/x?y=1", "has a query"),
    ("http://user:pw@127.0.0.1:9", "must not hold credentials"),
])
def test_bad_url_is_one_line(url: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["adapters", "list", "--url", url]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and "internal error" not in err[0] and "pw@" not in err[0], err


def test_url_with_the_openai_v1_suffix_means_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    from serving.client import server_url

    assert server_url("http://127.0.0.1:9/v1") == server_url("http://127.0.0.1:9/v1/") == "http://127.0.0.1:9"
    assert server_url("https://gw.example/") == "https://gw.example"
    assert server_url("https://gw.example/pissa/v1") == "https://gw.example/pissa"  # a reverse proxy's prefix
    assert server_url("http://v1:8000/v1") == "http://v1:8000"  # a host named v1
    assert run(["adapters", "list", "--url", "http://127.0.0.1:9/v1"]) == 1
    assert "http://127.0.0.1:9/v1/models" in capsys.readouterr().err  # not /v1/v1/models


def test_unset_api_key_env_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PISSA_TEST_NO_SUCH_KEY", raising=False)
    assert run(["adapters", "list", "--url", "http://127.0.0.1:9", "--api-key-env", "PISSA_TEST_NO_SUCH_KEY"]) == 2
    assert "'PISSA_TEST_NO_SUCH_KEY', which is not set" in capsys.readouterr().err


# --- a second review (2026-12-08): odd servers and names ------------------------------------------------------------
def test_names_vllm_cannot_start_with_are_refused_before_sending(standin, adapters):
    # "x=y" or "a,b" would be written into vLLM's --lora-modules NAME=PATH at the next start and break it.
    url, state = standin
    for name in ("x=y", "a,b", "my adapter", ""):
        with pytest.raises(InvalidOptionsError, match="adapter name"):
            add_adapter(url, name, adapters["good"], api_key=KEY)
    assert state["loads"] == []


def test_tenant_against_a_plain_server_unloads_again(standin, adapters):
    url, state = standin
    with pytest.raises(ServingError, match="not a pissa gateway.*unloaded again"):
        add_adapter(url, "t1", adapters["good"], api_key=KEY, tenants=["acme"])
    assert state["loads"] and state["adapters"] == {}  # loaded, then taken back: not served ungated


def _serve_once(answer: bytes):
    """A server that answers every request with ``answer`` (raw bytes, status line included)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def loop():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=loop, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}"


def _http(body: bytes, status: str = "200 OK", ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            .encode() + body)


@pytest.mark.parametrize("answer, fragment", [
    (_http(b"garbage"), "is not a vLLM server"),
    (_http(b"<html><body>hi</body></html>", ctype="text/html"), "is not a vLLM server"),
    (_http(b"[1, 2, 3]"), "is not a vLLM server"),
    (_http(b'{"data": [{"root": "x"}]}'), "is not a vLLM server"),
    (_http(b'{"data": {"id": "base"}}'), "is not a vLLM server"),
    (b"NOT HTTP AT ALL\r\n\r\n", "did not answer HTTP"),
    (_http(b"<html>" + b"Internal Server Error\n" * 40 + b"</html>", "500 Internal Server Error", "text/html"),
     "HTTP 500: (an HTML page)"),
    (_http(b'{"data": [{"id": "base", "root": null, "parent": null}]}'), "reports no path for its base"),
])
def test_odd_servers_are_one_line(answer, fragment, adapters, capsys):
    server, url = _serve_once(answer)
    try:
        code = run(["adapters", "add", "t1", str(adapters["good"]), "--url", url])
    finally:
        server.close()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and fragment in err[0] and "internal error" not in err[0], err

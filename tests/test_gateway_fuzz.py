"""Fuzzed input against the tenant gateway (hypothesis): bodies, field types, headers, paths, methods.

Properties, for every generated request:

* the gateway itself never answers 5xx: a 5xx reaches the client only when the stand-in vLLM sent
  that same 5xx for this request (the upstream transport records every answer);
* every error the gateway writes has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``;
  an upstream answer is passed on byte for byte;
* nothing reaches the stand-in unless the request carried a valid key (built from a live tenant or
  admin key), a tenant's request reaches it only on an inference path and only for a model on the
  tenant's list, with the internal key and none of the client's headers;
* a tenant's 200 answers only ever name its own models.

The app is driven in-process through raw ASGI calls (no client normalises the path or refuses a
header), and a few path tricks are also sent as raw bytes over a socket to the gateway served by
uvicorn, where the HTTP parser decodes the request line.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serving.gateway import keys
from serving.gateway.app import Gateway
from serving.gateway.config import GatewayConfig, Limits, Tenant
from tests.fake_vllm import FakeVllm
from tests.gateway_env import ADMIN_KEY, running

INTERNAL = "internal"
TENANT_MODELS = {"acme": ("a1", "base"), "beta": ("b1",)}
CAP = 16
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
INFERENCE = ("/v1/completions", "/v1/chat/completions")
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics")


# --- the harness -----------------------------------------------------------------------------------
class RecordingTransport(httpx.AsyncBaseTransport):
    """The stand-in vLLM in-process; every answer it gives is recorded (status, body)."""

    def __init__(self, fake: FakeVllm) -> None:
        self.inner = httpx.ASGITransport(app=fake.app(), raise_app_exceptions=False)
        self.answers: list[tuple[str, int, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        self.answers.append((request.url.path, response.status_code, body))
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(body))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def asgi_call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                    raw_path: bytes | None = None) -> Answer:
    """One request straight into the ASGI app, exactly as given (no client-side checks)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": raw_path if raw_path is not None else
             path.encode("utf-8", "surrogatepass"), "root_path": "", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 50000), "server": ("gw", 80)}
    done = asyncio.Event()
    sent = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    try:
        await app(scope, receive, send)
    except Exception:  # an unhandled error: Starlette has answered 500 (and re-raised)
        if "status" not in start:
            raise
    done.set()
    hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}
    return Answer(start["status"], hdrs, b"".join(chunks))


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    gateway: Gateway
    app: Any
    fake: FakeVllm
    upstream: RecordingTransport
    keys: dict[str, str]  # owner (tenant name or "admin") -> key
    revoked: str

    def __repr__(self) -> str:
        return "Harness()"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' falsifying-example printer
        printer.text("Harness()")

    def call(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"",
             raw_path: bytes | None = None) -> tuple[Answer, list[dict[str, Any]], list[tuple[str, int, bytes]]]:
        """Send one request; return the answer, what reached the stand-in and what the stand-in answered."""
        seen, answered = len(self.fake.seen), len(self.upstream.answers)
        answer = self.loop.run_until_complete(
            asyncio.wait_for(asgi_call(self.app, method, path, headers, body, raw_path), 30))
        return answer, self.fake.seen[seen:], self.upstream.answers[answered:]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("fuzz")
    limits = Limits(max_tokens=CAP)
    cfg = GatewayConfig("127.0.0.1", 0, tmp / "tenants.keys", tmp / "usage.sqlite",
                        tuple(Tenant(name, models, limits) for name, models in TENANT_MODELS.items()),
                        max_body_bytes=4096)
    issued = {name: keys.add_key(cfg.keys_file, name)[0] for name in TENANT_MODELS}
    revoked, record = keys.add_key(cfg.keys_file, "acme")
    keys.revoke_key(cfg.keys_file, record.id)
    fake = FakeVllm(key=INTERNAL)
    upstream = RecordingTransport(fake)
    gateway = Gateway(cfg, upstream="http://upstream", upstream_key=INTERNAL, admin_key=ADMIN_KEY,
                      transport=upstream)
    loop = asyncio.new_event_loop()
    ctx = gateway.running()
    loop.run_until_complete(ctx.__aenter__())
    try:
        yield Harness(loop, gateway, gateway.app(), fake, upstream, {**issued, "admin": ADMIN_KEY}, revoked)
    finally:
        loop.run_until_complete(ctx.__aexit__(None, None, None))
        loop.close()


# --- strategies ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Auth:
    header: bytes | None  # the Authorization value (None: no header)
    owner: str | None  # who the gateway must take the caller for (None: nobody)


def _mangled_keys(key: str, scheme: str) -> list[str]:
    """Authorization values that hold ``key`` but are not a bearer token equal to it."""
    return [key, f"Basic {key}", f"{scheme}{key}", f"{scheme} {key}x", f"{scheme} {key[:-1]}", f"{scheme} x{key}",
            f"{scheme} {key.upper()}", f"{scheme} {key}\r\nX-Injected: 1", f"{scheme} {key}\n", f"{scheme} {key} {key}",
            f"{scheme}\t{key}", f"{scheme} {key},{key}", f"Token {key}", f"{scheme} \"{key}\"", f"{scheme} ",
            f"{scheme} {key}\x00", f"{scheme} {key}\u00e9", f"{scheme} {key}\r", f"{scheme} {key}\x0b"]


def _auth(h: Harness, data: st.DataObject) -> Auth:
    kind = data.draw(st.sampled_from(["none", "valid", "valid", "valid", "mangled", "revoked", "arbitrary"]))
    if kind == "none":
        return Auth(None, None)
    if kind == "arbitrary":
        return Auth(data.draw(st.binary(max_size=80)), None)
    owner = data.draw(st.sampled_from(sorted(h.keys)))
    key = h.keys[owner]
    if kind == "revoked":
        return Auth(b"Bearer " + h.revoked.encode(), None)
    scheme = data.draw(st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]))
    if kind == "valid":
        pad = data.draw(st.sampled_from(["", " ", "  ", "\t"]))
        return Auth(f"{scheme} {pad}{key}{pad}".encode(), owner)
    mangled = data.draw(st.sampled_from(_mangled_keys(key, scheme)))
    return Auth(mangled.encode("utf-8"), None)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
MODELS = st.one_of(st.sampled_from(["a1", "a2", "b1", "base", "nope", "", "a1 ", "A1", "a1\x00", "../a1"]),
                   json_values)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": MODELS,
    "prompt": st.one_of(st.text(max_size=40), json_values, st.lists(st.integers(0, 100), max_size=5)),
    "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), json_values),
         "content": st.one_of(st.text(max_size=20), json_values)}), max_size=3)),
    "max_tokens": st.one_of(st.integers(-3, 2 * CAP), json_values),
    "max_completion_tokens": st.one_of(st.integers(-3, 2 * CAP), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": st.one_of(
        st.booleans(), json_values), "continuous_usage_stats": json_values}), json_values),
    "temperature": json_values, "top_p": json_values, "n": st.one_of(st.integers(-2, 4), json_values),
    "stop": json_values, "logprobs": json_values, "echo": json_values, "seed": json_values, "user": json_values,
    "tenants": json_values, "lora_name": st.one_of(st.sampled_from(["a1", "z9"]), json_values),
    "lora_path": st.one_of(st.just("/tmp/x"), json_values),
}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request body: mostly a JSON object with some of the known fields (any types), else anything."""
    kind = draw(st.sampled_from(["valid", "valid", "object", "object", "object", "json", "bytes", "huge", "deep"]))
    if kind == "valid":  # a well-formed request, one field (maybe) of another type: reaches deeper
        obj = {"model": draw(st.sampled_from(["a1", "a2", "b1", "base"])), "max_tokens": draw(st.integers(1, 8))}
        obj.update({"messages": [{"role": "user", "content": "hi"}]} if draw(st.booleans()) else {"prompt": "hi"})
        if draw(st.booleans()):
            obj["stream"] = True
        name = draw(st.sampled_from(sorted(FIELDS)))
        if draw(st.booleans()):
            obj[name] = draw(FIELDS[name])
        return json.dumps(obj).encode()
    if kind == "object":
        names = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=8))
        obj = {name: draw(FIELDS[name]) for name in sorted(names)}
        obj.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
        return json.dumps(obj).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "huge":
        return b'{"model": "a1", "prompt": "' + b"x" * draw(st.integers(4000, 20000)) + b'"}'
    depth = draw(st.integers(50, 5000))
    return b"[" * depth + b"]" * depth


# --- the checks ------------------------------------------------------------------------------------
def check(h: Harness, auth: Auth, path: str, answer: Answer, reached: list[dict[str, Any]],
          answered: list[tuple[str, int, bytes]]) -> None:
    upstream_statuses = [status for p, status, _ in answered if p != "/health"]
    if answer.status >= 500:
        assert answer.status in upstream_statuses, f"the gateway itself answered {answer.status}: {answer.body!r}"
    if answer.status >= 400 and not upstream_statuses:
        error = json.loads(answer.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, answer.body
        assert isinstance(error["message"], str) and error["code"] == answer.status
    if auth.owner is None:
        assert reached == [], f"forwarded without a valid key: {auth.header!r} {path}"
    for entry in reached:
        assert entry["headers"].get("authorization") == f"Bearer {INTERNAL}"
        assert set(entry["headers"]) <= {"host", "accept", "accept-encoding", "connection", "user-agent",
                                         "content-type", "content-length", "authorization"}, entry["headers"]
    if auth.owner in TENANT_MODELS:
        allowed = TENANT_MODELS[auth.owner]
        for entry in reached:
            assert entry["path"] in (*INFERENCE, "/v1/models"), f"a tenant reached {entry['path']}"
            if entry["path"] in INFERENCE:
                assert json.loads(entry["raw"])["model"] in allowed
        if answer.status == 200 and path in INFERENCE:
            for line in answer.body.splitlines():
                line = line.removeprefix(b"data: ")
                if line.startswith(b"{"):
                    assert json.loads(line)["model"] in allowed
        if answer.status == 200 and path == "/v1/models":
            assert {m["id"] for m in json.loads(answer.body)["data"]} <= set(allowed)
    if answer.status < 400 and answered and path in INFERENCE and answer.headers.get("content-type", "") \
            .startswith("application/json"):
        assert answer.body == answered[-1][2]  # passed on unchanged


def headers_for(auth: Auth, extra: list[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    out = [(b"host", b"gw"), *extra]
    if auth.header is not None:
        out.append((b"authorization", auth.header))
    return out


# --- properties ------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data(), path=st.sampled_from(INFERENCE), body=bodies(),
       content_type=st.sampled_from([b"application/json", b"text/plain", b"", b"application/json; charset=latin-1"]))
def test_fuzzed_inference_bodies(harness: Harness, data: st.DataObject, path: str, body: bytes,
                                 content_type: bytes) -> None:
    auth = _auth(harness, data)
    answer, reached, answered = harness.call("POST", path, headers_for(auth, [(b"content-type", content_type)]),
                                             body)
    check(harness, auth, path, answer, reached, answered)
    if len(body) > 4096 and auth.owner is not None:
        assert answer.status == 413


def test_every_mangled_key_is_refused(harness: Harness) -> None:
    """Each mangled form, not only the ones a fuzz run happens to draw (a key followed by "\n" was taken
    for the key: the token was stripped of all whitespace, not only HTTP's spaces and tabs)."""
    for owner, key in sorted(harness.keys.items()):
        for value in _mangled_keys(key, "Bearer"):
            auth = Auth(value.encode("utf-8"), None)
            answer, reached, answered = harness.call("POST", "/v1/completions", headers_for(auth, []),
                                                     b'{"model": "a1", "max_tokens": 1, "prompt": "hi"}')
            assert answer.status == 401 and reached == [], (owner, value, answer.status)


CONTENT_LENGTHS = st.one_of(  # what a Content-Length may look like to a parser that does not check it
    st.text(alphabet="0123456789\u00b2\u00b3\u00b9 +-_x", max_size=12).map(lambda s: s.encode("latin-1")),
    st.builds(lambda digit, k: digit * k, st.sampled_from([b"0", b"1", b"9"]), st.integers(1, 6000)))


@FUZZ
@given(data=st.data(), body=bodies(), path=st.sampled_from(INFERENCE),
       names=st.lists(st.one_of(st.sampled_from(["x-forwarded-for", "cookie", "host", "content-length",
                                                 "transfer-encoding", "authorization", "x-api-key", "accept",
                                                 "content-type", "connection", "expect", "upgrade"]),
                                st.from_regex(rb"[a-z][a-z0-9-]{0,20}", fullmatch=True).map(bytes.decode)),
                      max_size=5),
       values=st.lists(st.one_of(st.binary(max_size=60), CONTENT_LENGTHS), min_size=5, max_size=5))
def test_fuzzed_headers(harness: Harness, data: st.DataObject, body: bytes, path: str, names: list[str],
                        values: list[bytes]) -> None:
    """Arbitrary header names and values (CR/LF, NUL, latin-1, duplicates, a bogus Content-Length)."""
    auth = _auth(harness, data)
    extra = [(n.encode(), v) for n, v in zip(names, values, strict=False)]
    answer, reached, answered = harness.call("POST", path, headers_for(auth, extra), body)
    check(harness, auth, path, answer, reached, answered)


@pytest.mark.parametrize("declared", [b"\xb2", b"\xb9", b"9" * 5000, b"0" * 5000, b"1" + b"0" * 30],
                         ids=["superscript-2", "superscript-1", "5000-nines", "5000-zeros", "1e30"])
def test_a_content_length_that_is_not_a_small_ascii_number_is_refused_not_a_crash(harness: Harness,
                                                                                   declared: bytes) -> None:
    """Regression: ``"²".isdigit()`` is true but ``int("²")`` raises, and so does ``int()`` of 5000 digits
    (zeros too): each was a 500 from the gateway itself."""
    auth = Auth(f"Bearer {harness.keys['acme']}".encode(), "acme")
    headers = headers_for(auth, [(b"content-length", declared), (b"content-type", b"application/json")])
    answer, reached, answered = harness.call("POST", "/v1/completions", headers, b'{"model": "a1"}')
    check(harness, auth, "/v1/completions", answer, reached, answered)
    if declared.strip(b"0"):  # "000...0" is a valid 0
        assert answer.status in (400, 413) and reached == []


PATH_TRICKS = [
    "/v1/../load_lora_adapter", "/v1/../v1/load_lora_adapter", "/v1/%2e%2e/load_lora_adapter",
    "/v1/%2E%2E/v1/load_lora_adapter", "/v1%2Fload_lora_adapter", "/v1%2fcompletions", "//v1/completions",
    "/v1//completions", "/v1/completions/", "/v1/models/", "/v1/load_lora_adapter/", "/V1/completions",
    "/v1/completions;x", "/v1/completions%00", "/v1/completions\x00", "/v1/comp\u0131etions", "/v1/c\u00f6mpletions",
    "/v1/./completions", "/./v1/models", "/v1/completions?model=a2", "/v1/completions#x", "\\v1\\completions",
    "/v1/load_lora_adapter%3F", "/metrics/", "/metrics%2F..", "/health/../metrics", "", "*", "/v1/models/a1",
    "/v1/unload_lora_adapter", "/v1/load_lora_adapter", "/metrics", "/v1/models", "/health", "/v1/completions",
    "/v1/chat/completions", "/v1/embeddings", "/invocations", "/tokenize", "/v1/responses", "/docs",
]


@FUZZ
@given(data=st.data(), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH",
                                               "TRACE", "CONNECT", "get", "FOO", "POST "]),
       path=st.one_of(st.sampled_from(PATH_TRICKS), st.text(max_size=40).map(lambda s: "/" + s),
                      st.builds(lambda a, b: a + b, st.sampled_from(PATH_TRICKS), st.text(max_size=10))),
       body=bodies())
def test_fuzzed_paths_and_methods(harness: Harness, data: st.DataObject, method: str, path: str,
                                  body: bytes) -> None:
    auth = _auth(harness, data)
    answer, reached, answered = harness.call(method, path, headers_for(auth), body)
    check(harness, auth, path, answer, reached, answered)
    if auth.owner in TENANT_MODELS:
        assert all(entry["path"] not in ADMIN_PATHS for entry in reached)


# --- raw bytes over a socket to uvicorn ------------------------------------------------------------
def raw_request(port: int, data: bytes) -> tuple[int | None, bytes]:
    """Send ``data`` as is; the status (None: the server closed without answering) and the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # the server refused the request by closing the connection
    if not reply.startswith(b"HTTP/1."):
        return None, reply
    return int(reply.split(b" ", 2)[1]), reply


RAW_TARGETS = [
    (b"GET", b"/v1/../v1/models"), (b"POST", b"/v1/%2e%2e/v1/load_lora_adapter"),
    (b"POST", b"/v1/../load_lora_adapter"), (b"POST", b"/v1%2Fload_lora_adapter"),
    (b"POST", b"/v1%2fload_lora_adapter"), (b"POST", b"http://evil.example/v1/load_lora_adapter"),
    (b"POST", b"http://127.0.0.1:1/v1/completions"), (b"GET", b"//v1/models"), (b"GET", b"/v1/models/"),
    (b"POST", b"/v1//completions"), (b"POST", b"/v1/completions%00"), (b"POST", b"/v1/c%C3%B6mpletions"),
    (b"POST", b"/v1/comp\xc3\xb6letions"), (b"GET", b"*"), (b"POST", b"/metrics%2F..%2Fv1%2Fload_lora_adapter"),
    (b"POST", b"/v1/completions?x=%ZZ"), (b"POST", b"/" + b"a" * 70000), (b"GET", b"/v1/models?" + b"q" * 70000),
]


@pytest.mark.parametrize("who", ["none", "tenant"])
def test_raw_path_tricks_over_a_socket(tmp_path: Path, who: str) -> None:
    with running(tmp_path) as g:
        port = int(g.url.rsplit(":", 1)[1])
        key = g.keys["beta"]
        auth = f"Authorization: Bearer {key}\r\n".encode() if who == "tenant" else b""
        body = json.dumps({"model": "b1", "prompt": "hi", "max_tokens": 2, "lora_name": "z",
                           "lora_path": "/tmp"}).encode()
        extra_requests = [
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + auth + b"X-Long: " + b"v" * 200_000 + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + b"k" * 200_000 + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n" + auth + b"Content-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n" + auth + b"Content-Length: 99999999999999999999\r\n\r\n{}",
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n" + auth + b"Content-Length: -1\r\n\r\n{}",
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-A: 1\nAuthorization: Bearer " + key.encode()
            + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: gw/v1/load_lora_adapter?\r\n" + auth + b"\r\n",
            b"GET /v1/models HTTP/1.0\r\n" + auth + b"\r\n",
            b"GET /v1/models HTTP/9.9\r\n" + auth + b"\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,
        ]
        requests = [method + b" " + target + b" HTTP/1.1\r\nHost: gw\r\n" + auth + b"Content-Type: application/json"
                    + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
                    for method, target in RAW_TARGETS]
        statuses = []
        for request in requests + extra_requests:
            before = len(g.fake.seen)
            if b"Connection: close" not in request and b"\r\n" in request:  # one request per connection
                line, rest = request.split(b"\r\n", 1)
                request = line + b"\r\nConnection: close\r\n" + rest
            status, reply = raw_request(port, request)
            statuses.append(status)
            assert status is None or status < 500, (request[:120], reply[:300])
            reached = g.fake.seen[before:]
            if who == "none":
                assert reached == [], request[:120]
            for entry in reached:
                assert entry["path"] in ("/v1/models", *INFERENCE), (request[:120], entry["path"])
                if entry["path"] in INFERENCE:
                    assert json.loads(entry["raw"])["model"] == "b1"
        # the tricks are refused, not served: none of the encoded admin paths reached an admin route
        assert all(s is not None for s in statuses[:len(RAW_TARGETS) - 2])


# --- a model server that answers nonsense ----------------------------------------------------------
class HostileTransport(httpx.AsyncBaseTransport):
    """Answers every request with the status, content type and bytes set in ``next``."""

    def __init__(self) -> None:
        self.next: tuple[int, str, bytes] = (200, "application/json", b"{}")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        status, media, body = self.next
        return httpx.Response(status, headers={"content-type": media}, content=body)


UPSTREAM_BODIES = st.one_of(
    st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"data": json_values, "usage": json_values, "model": json_values,
                                        "choices": json_values}).map(lambda v: json.dumps(v).encode()),
    st.lists(st.one_of(st.just(b"data: [DONE]\n\n"), json_values.map(lambda v: b"data: " + json.dumps(v).encode()
                                                                     + b"\n\n"), st.binary(max_size=30)),
             max_size=4).map(b"".join))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, HostileTransport]]:
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = GatewayConfig("127.0.0.1", 0, tmp / "tenants.keys", tmp / "usage.sqlite",
                        (Tenant("acme", ("a1", "base"), Limits(max_tokens=CAP)),), max_body_bytes=4096)
    key = keys.add_key(cfg.keys_file, "acme")[0]
    transport = HostileTransport()
    gateway = Gateway(cfg, upstream="http://upstream", upstream_key=INTERNAL, admin_key=ADMIN_KEY,
                      transport=transport)
    loop = asyncio.new_event_loop()
    ctx = gateway.running()
    loop.run_until_complete(ctx.__aenter__())
    try:
        fake = FakeVllm()  # unused: nothing is recorded behind a hostile server
        yield Harness(loop, gateway, gateway.app(), fake, RecordingTransport(fake),
                      {"acme": key, "admin": ADMIN_KEY}, ""), transport
    finally:
        loop.run_until_complete(ctx.__aexit__(None, None, None))
        loop.close()


MODELS_REQUEST = ("GET", "/v1/models", b"")
COMPLETION_REQUEST = ("POST", "/v1/completions", b'{"model": "a1", "prompt": "x"}')


@FUZZ
@example(status=200, media="application/json", upstream_body=b"", owner="acme",  # regression: was a 500
         request=MODELS_REQUEST)
@example(status=200, media="application/json", upstream_body=b'{"data": [1]}', owner="acme",  # ditto
         request=MODELS_REQUEST)
@example(status=200, media="application/json", upstream_body=b"true", owner="acme",  # ditto (usage_of)
         request=COMPLETION_REQUEST)
@example(status=200, media="application/json", upstream_body=b'{"data": [], "model": Infinity}', owner="acme",
         request=MODELS_REQUEST)  # ditto: Python's json reads Infinity, but cannot write it back
@example(status=200, media="application/json", upstream_body=b"[" * 100_000, owner="acme",
         request=MODELS_REQUEST)  # ditto: nested too deep for Python's json (RecursionError)
@example(status=200, media="application/json", upstream_body=b"[" * 100_000, owner="acme",
         request=COMPLETION_REQUEST)
@example(status=200, media="text/event-stream", upstream_body=b"data: " + b"[" * 100_000 + b"\n\n", owner="acme",
         request=("POST", "/v1/chat/completions", b'{"model": "a1", "messages": [], "stream": true}'))
@given(status=st.sampled_from([200, 200, 200, 201, 204, 400, 404, 500, 503]),
       media=st.sampled_from(["application/json", "text/event-stream", "text/plain", ""]),
       upstream_body=UPSTREAM_BODIES, owner=st.sampled_from(["acme", "admin"]),
       request=st.sampled_from([MODELS_REQUEST, COMPLETION_REQUEST,
                                ("POST", "/v1/chat/completions", b'{"model": "a1", "messages": [], "stream": true}'),
                                ("POST", "/v1/load_lora_adapter", b'{"lora_name": "n", "lora_path": "/p"}'),
                                ("POST", "/v1/unload_lora_adapter", b'{"lora_name": "n"}')]))
def test_a_model_server_answering_nonsense_never_crashes_the_gateway(
        hostile: tuple[Harness, HostileTransport], status: int, media: str, upstream_body: bytes, owner: str,
        request: tuple[str, str, bytes]) -> None:
    """Whatever the model server answers, the gateway answers it (passed on, or 502), never 500 of its own."""
    h, transport = hostile
    transport.next = (status, media, upstream_body)
    method, path, body = request
    answer, _, _ = h.call(method, path, [(b"authorization", f"Bearer {h.keys[owner]}".encode()),
                                         (b"content-type", b"application/json")], body)
    assert answer.status == status or answer.status == 502 or (owner == "acme" and path in ADMIN_PATHS), \
        (answer.status, answer.body[:200])

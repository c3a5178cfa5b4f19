"""The gateway's ASGI app (Starlette): authenticate, check the model against the tenant's list, enforce
limits, count usage, forward bytes to vLLM.

Routes (nothing else is forwarded; any other path is 404 and never reaches vLLM):

==============================  =========================================================================
``GET /health``                 vLLM's health (200/503), no key needed
``GET /v1/models``              a tenant sees only its models; the admin key sees all
``POST /v1/completions``        forwarded unchanged (streaming too) when the model is on the tenant's list;
``POST /v1/chat/completions``   a missing ``max_tokens`` is set to the tenant's cap, and a stream gets
                                ``include_usage`` (its usage chunk is dropped again if the client did not
                                ask for it) so that streamed tokens are counted exactly
``POST /v1/load_lora_adapter``  admin key only; ``"tenants": [...]`` in the body grants the adapter
``POST /v1/unload_lora_adapter`` admin key only; the adapter leaves every tenant's list
``GET /metrics``                admin key only: the gateway's Prometheus metrics
==============================  =========================================================================

No key, an unknown or revoked key → 401; a tenant on an admin path → 403; a model the tenant may not
call → the same 404 as for a model that does not exist. Requests are forwarded to fixed upstream
paths (never the client's path) with the internal key, only ``Content-Type`` and ``Accept`` copied.
Keys, prompts and completions are never logged: the access log has one JSON line per request with
time, tenant, key id, model, status, tokens, latency and upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pissa.core.manifests import name_problem
from serving.gateway import store
from serving.gateway.config import GatewayConfig, Tenant
from serving.gateway.keys import KeyStore
from serving.gateway.limiter import Admission, default_max_tokens, max_tokens_problem, shape_problem
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.responses import error, model_not_found
from serving.gateway.sse import EventSplitter, event_data, is_usage_only, usage_of

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("serving.gateway.access")

ADMIN = "admin"
STREAM_BROKE = ("data: " + json.dumps({"error": {
    "message": "the model server stopped in the middle of this stream; send the request again",
    "type": "BadGatewayError", "param": None, "code": 502}}) + "\n\n").encode()
MAX_LOGGED_NAME = 128


@dataclass(frozen=True)
class Caller:
    tenant: Tenant | None  # None: the admin key
    key_id: str

    @property
    def name(self) -> str:
        return self.tenant.name if self.tenant else ADMIN


@dataclass
class Exchange:
    """One request as the access log and the metrics see it."""

    path: str
    t0: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    model: str | None = None
    stream: bool = False
    admitted: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finished: bool = False


class Gateway:
    """The state behind the app: keys, limits, usage, grants and the upstream client.

    Args:
        config: the manifest's gateway and tenants.
        upstream: vLLM's base URL (loopback).
        upstream_key: vLLM's internal API key (None: vLLM runs without one).
        admin_key: the key for admin paths (None: admin paths are closed to everyone).
        transport: an httpx transport for the upstream (tests); default: the network.
        hash_header: with replicas behind vllm-router, the header its ``consistent_hash`` policy reads;
            set to the requested model name, so that each adapter stays on one replica.
        replicas: every vLLM server behind ``upstream`` (the router): adapter loads and unloads go to each
            (default: ``upstream`` alone).
    """

    def __init__(self, config: GatewayConfig, *, upstream: str, upstream_key: str | None, admin_key: str | None,
                 transport: httpx.AsyncBaseTransport | None = None, hash_header: str | None = None,
                 replicas: Sequence[str] = ()) -> None:
        self.config = config
        self.upstream = upstream.rstrip("/")
        self.hash_header = hash_header
        self.replicas = tuple(r.rstrip("/") for r in replicas) or (self.upstream,)
        self._upstream_key = upstream_key
        self._admin_key = hashlib.sha256(admin_key.encode()).digest() if admin_key else None  # compared as digests
        self._transport = transport
        self.keys = KeyStore(config.keys_file)
        self.metrics = GatewayMetrics()
        self.removed: set[str] = set()
        # Runtime grants, minus names the manifest serves itself (a grant must never reach a manifest adapter).
        self.granted: dict[str, set[str]] = {t: m - set(config.served) for t, m in store.grants(config.usage_db).items()}
        self.usage: store.UsageWriter | None = None
        self.admission = Admission(config.tenants, lambda t: self.usage.tokens_today(t) if self.usage else 0)
        self._client: httpx.AsyncClient | None = None

    # --- life cycle -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Open the upstream client and the usage writer; on exit close them (pending usage is written)."""
        handler = None
        if self.config.access_log is not None:  # one JSON line per request into its own file
            self.config.access_log.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.config.access_log, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            access_logger.addHandler(handler)
            access_logger.setLevel(logging.INFO)
            access_logger.propagate = False
        self.usage = store.UsageWriter(self.config.usage_db)
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(transport=self._transport, limits=limits,
                                         timeout=httpx.Timeout(None, connect=10.0))
        try:
            yield self
        finally:
            await self._client.aclose()
            await asyncio.to_thread(self.usage.close)
            if handler is not None:
                access_logger.removeHandler(handler)
                access_logger.propagate = True
                handler.close()

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.inference, methods=["POST"]),
            Route("/v1/chat/completions", self.inference, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with self.running():
                yield

        app = Starlette(routes=routes, lifespan=lifespan,
                        exception_handlers={HTTPException: self._http_error})  # type: ignore[dict-item]
        app.router.redirect_slashes = False
        return app

    # --- pieces -----------------------------------------------------------------------------------
    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "use the app's lifespan or `async with gateway.running()`"
        return self._client

    def caller(self, request: Request) -> Caller | None:
        """The key's owner, or None (no key, malformed, unknown, revoked, or its tenant is gone)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip(" \t")  # HTTP's optional whitespace only: a key followed by "\n" is not that key
        if scheme.lower() != "bearer" or not token:
            return None
        raw = token.encode("utf-8", "surrogateescape")
        if self._admin_key is not None and hmac.compare_digest(hashlib.sha256(raw).digest(), self._admin_key):
            return Caller(None, ADMIN)
        record = self.keys.authenticate(token)
        tenant = self.config.tenant(record.tenant) if record else None
        return Caller(tenant, record.id) if tenant and record else None

    def allowed(self, tenant: Tenant) -> set[str]:
        """The models ``tenant`` may call now: its manifest list minus removed adapters, plus runtime grants."""
        return (set(tenant.models) - self.removed) | self.granted.get(tenant.name, set())

    def _upstream_headers(self, accept: str | None = None, model: str | None = None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if accept:
            headers["accept"] = accept
        if self.hash_header and model and model.isascii() and model.isprintable():
            headers[self.hash_header] = model
        if self._upstream_key:
            headers["authorization"] = f"Bearer {self._upstream_key}"
        return headers

    async def _read_json(self, request: Request) -> tuple[bytes, dict[str, Any]] | Response:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):  # "²".isdigit() is true, int("²") fails
                return error(400, "invalid Content-Length header")
            digits = declared.lstrip("0") or "0"  # int() refuses strings of more than 4300 digits
            if len(digits) > len(str(limit)) or int(digits) > limit:
                return error(413, f"request body is larger than {limit} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return error(413, f"request body is larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            return error(499, "the client went away before sending its whole body")
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object")
        return raw, body

    def _finish(self, ex: Exchange, status: int) -> None:
        """Account for a finished request (once): limits, usage, metrics, one access-log line."""
        if ex.finished:
            return
        ex.finished = True
        tenant = ex.caller.name if ex.caller else None
        if ex.admitted and ex.caller and ex.caller.tenant:
            self.admission.release(ex.caller.tenant.name)
            self.metrics.in_flight.labels(ex.caller.tenant.name).dec()
        if tenant and ex.caller and ex.caller.tenant and ex.model and ex.prompt_tokens is not None:
            assert self.usage is not None
            self.usage.add(tenant, ex.model, ex.prompt_tokens, ex.completion_tokens or 0)
        elapsed = time.perf_counter() - ex.t0
        label = tenant or "-"
        self.metrics.requests.labels(label, ex.model if ex.admitted else "-", str(status)).inc()
        self.metrics.latency.labels(label).observe(elapsed)
        if ex.prompt_tokens is not None:
            self.metrics.tokens.labels(label, "prompt").inc(ex.prompt_tokens)
            self.metrics.tokens.labels(label, "completion").inc(ex.completion_tokens or 0)
        if status in (401, 403, 404, 413, 429):
            self.metrics.refused.labels(label, str(status)).inc()
        access_logger.info(json.dumps({
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "tenant": tenant, "key_id": ex.caller.key_id if ex.caller else None,
            "model": ex.model[:MAX_LOGGED_NAME] if ex.model else None, "path": ex.path, "status": status,
            "stream": ex.stream, "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
            "latency_ms": round(elapsed * 1000, 2), "upstream": self.upstream,
        }))

    def _answer(self, ex: Exchange, response: Response) -> Response:
        self._finish(ex, response.status_code)
        return response

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = "method not allowed" if exc.status_code == 405 else "not found"
        return self._answer(Exchange(request.url.path[:MAX_LOGGED_NAME]), error(exc.status_code, message))

    # --- routes -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        try:
            r = await self.client.get(self.upstream + "/health", timeout=5.0)
            status = r.status_code
        except httpx.HTTPError:
            status = 503
        return Response(status_code=200 if status == 200 else 503)

    async def models(self, request: Request) -> Response:
        ex = Exchange("/v1/models", caller=self.caller(request))
        if ex.caller is None:
            return self._answer(ex, _unauthorized())
        try:
            r = await self.client.get(self.upstream + "/v1/models", headers=self._upstream_headers())
        except httpx.HTTPError:
            return self._answer(ex, _unreachable())
        if r.status_code != 200 or ex.caller.tenant is None:
            return self._answer(ex, Response(r.content, r.status_code, media_type="application/json"))
        allowed = self.allowed(ex.caller.tenant)
        try:
            data = r.json()
            data["data"] = [{k: v for k, v in m.items() if k != "root"}  # an adapter's root: a path on the server
                            for m in data["data"] if isinstance(m, dict) and m.get("id") in allowed]
            # Rendered here: JSON with NaN or Infinity (Python's json reads them) cannot be written back (ValueError).
            filtered = JSONResponse(data)
        except (ValueError, LookupError, TypeError, RecursionError):  # not vLLM's {"data": [{"id": ...}, ...]}
            logger.warning("the model server's /v1/models answer could not be read as a model list")
            return self._answer(ex, error(502, "the model server's model list could not be read"))
        return self._answer(ex, filtered)

    async def inference(self, request: Request) -> Response:
        path = request.url.path
        ex = Exchange(path, caller=self.caller(request))
        if ex.caller is None:
            return self._answer(ex, _unauthorized())
        parsed = await self._read_json(request)
        if isinstance(parsed, Response):
            return self._answer(ex, parsed)
        raw, body = parsed
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._answer(ex, error(400, "`model` is required and must be a string", param="model"))
        ex.model = model
        tenant = ex.caller.tenant
        changed = False
        if tenant is not None:
            if model not in self.allowed(tenant):
                return self._answer(ex, model_not_found(model))
            problem = max_tokens_problem(body, tenant.limits)
            if problem:
                return self._answer(ex, error(400, problem, param="max_tokens"))
            default = default_max_tokens(path, body, tenant.limits)
            if default is not None:
                body["max_tokens"] = default
                changed = True
        else:
            problem = shape_problem(body)
            if problem:
                return self._answer(ex, error(400, problem))
        ex.stream = body.get("stream") is True
        strip_usage = False
        if ex.stream:
            options = body.get("stream_options")
            if options is None or (isinstance(options, dict) and options.get("include_usage") in (None, False)):
                body["stream_options"] = {**(options or {}), "include_usage": True}
                strip_usage = changed = True
        if tenant is not None:
            refusal = self.admission.admit(tenant.name)
            if refusal is not None:
                return self._answer(ex, error(refusal.status, refusal.message, retry_after=refusal.retry_after))
            ex.admitted = True
            self.metrics.in_flight.labels(tenant.name).inc()
        try:
            return await self._forward(request.url.path, ex, body if changed else None, raw, strip_usage)
        except BaseException:
            self._finish(ex, 499)  # e.g. cancelled while waiting for vLLM: free the concurrency slot
            raise

    async def _forward(self, path: str, ex: Exchange, body: dict[str, Any] | None, raw: bytes,
                       strip_usage: bool) -> Response:
        content = json.dumps(body).encode() if body is not None else raw
        upstream_request = self.client.build_request(
            "POST", self.upstream + path, content=content,
            headers=self._upstream_headers("text/event-stream" if ex.stream else "application/json", ex.model))
        try:
            upstream, body_chunks, first = await self._open(upstream_request)
        except httpx.HTTPError:
            return self._answer(ex, _unreachable())
        media = upstream.headers.get("content-type", "application/json")
        if not (ex.stream and upstream.status_code == 200 and media.startswith("text/event-stream")):
            try:
                data = first + b"".join([chunk async for chunk in body_chunks])
            except httpx.HTTPError:
                return self._answer(ex, _unreachable())
            finally:
                await upstream.aclose()
            if upstream.status_code == 200:
                with contextlib.suppress(ValueError, RecursionError):  # not JSON, or nested too deep to read
                    usage = usage_of(json.loads(data))
                    if usage:
                        ex.prompt_tokens, ex.completion_tokens = usage
            return self._answer(ex, Response(data, upstream.status_code, media_type=media))
        return Relay(StreamRelay(upstream, ex, strip_usage, self._finish, first, body_chunks), media)

    async def _admin_json(self, request: Request, ex: Exchange) -> dict[str, Any] | Response:
        """The JSON body of an admin request, or the refusal (no admin key, bad body)."""
        refused = _admin_only(ex.caller)
        if refused is not None:
            return refused
        parsed = await self._read_json(request)
        return parsed if isinstance(parsed, Response) else parsed[1]

    async def _open(self, request: httpx.Request) -> tuple[httpx.Response, AsyncIterator[bytes], bytes]:
        """Send ``request`` and read the first bytes of the answer; send it once more if the upstream failed
        before any byte came. vllm-router retries a failed request on another replica itself, except a
        stream: it answers 200 before its replica has, so a replica dying then would cut the stream before
        its first byte (see docs/serving.md, Replicas)."""
        for attempt in (1, 2):
            try:
                upstream = await self.client.send(request, stream=True)
            except httpx.HTTPError:
                if attempt == 2:
                    raise
                continue
            if upstream.is_stream_consumed:  # a transport that handed over the whole body at once
                return upstream, _no_more(), upstream.content
            body_chunks = upstream.aiter_raw()
            try:
                first = await body_chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            except httpx.HTTPError:
                await upstream.aclose()
                if attempt == 2:
                    raise
                logger.warning("upstream failed before its first byte (%s): sending the request again", request.url.path)
                continue
            return upstream, body_chunks, first
        raise AssertionError("unreachable")

    async def load_adapter(self, request: Request) -> Response:
        ex = Exchange("/v1/load_lora_adapter", caller=self.caller(request))
        body = await self._admin_json(request, ex)
        if isinstance(body, Response):
            return self._answer(ex, body)
        tenants = body.pop("tenants", None)
        tenants = [] if tenants is None else tenants
        known = {t.name for t in self.config.tenants}
        if not isinstance(tenants, list) or not all(isinstance(t, str) and t in known for t in tenants):
            return self._answer(ex, error(400, "`tenants` must list tenants of the manifest: " + ", ".join(sorted(known)),
                                          param="tenants"))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return self._answer(ex, error(400, "`lora_name` and `lora_path` must be strings"))
        if problem := name_problem(name):  # it is served again at the next start, in vLLM's --lora-modules NAME=PATH
            return self._answer(ex, error(400, f"`lora_name` {problem}", param="lora_name"))
        ex.model = name
        if name in self.config.served:
            return self._answer(ex, error(400, f"`{name}` is served from the manifest; load the new adapter under "
                                               "another name", param="lora_name"))
        response = await self._forward_admin(request.url.path, body)
        if response.status_code == 200:
            await asyncio.to_thread(store.record_runtime_adapter, self.config.usage_db, name, path, tenants)
            self.removed.discard(name)
            for grants in self.granted.values():
                grants.discard(name)
            for t in tenants:
                self.granted.setdefault(t, set()).add(name)
            response.headers["x-pissa-granted"] = ",".join(tenants)
        return self._answer(ex, response)

    async def unload_adapter(self, request: Request) -> Response:
        ex = Exchange("/v1/unload_lora_adapter", caller=self.caller(request))
        body = await self._admin_json(request, ex)
        if isinstance(body, Response):
            return self._answer(ex, body)
        name = body.get("lora_name")
        if not isinstance(name, str):
            return self._answer(ex, error(400, "`lora_name` must be a string"))
        ex.model = name
        response = await self._forward_admin(request.url.path, body)
        if response.status_code == 200:
            await asyncio.to_thread(store.forget_model, self.config.usage_db, name)
            self.removed.add(name)
            for grants in self.granted.values():
                grants.discard(name)
        return self._answer(ex, response)

    async def _forward_admin(self, path: str, body: dict[str, Any]) -> Response:
        """Send an adapter load/unload to every replica. One server: its answer as is. Several: 200 when
        every reachable replica accepted it (an unreachable local replica gets the runtime adapters when
        it is restarted), else the first refusal's status; the body lists each replica's answer."""
        content = json.dumps(body).encode()

        async def one(url: str) -> tuple[int, bytes, str]:
            try:
                r = await self.client.post(url + path, content=content, headers=self._upstream_headers())
            except httpx.HTTPError:
                return 0, b"unreachable", "text/plain"
            return r.status_code, r.content, r.headers.get("content-type", "text/plain")

        answers = await asyncio.gather(*(one(url) for url in self.replicas))
        if len(answers) == 1:
            status, content_, media = answers[0]
            return _unreachable() if status == 0 else Response(content_, status, media_type=media)
        results = [{"url": url, "status": status or None, "message": text.decode("utf-8", "replace")[:500]}
                   for url, (status, text, _) in zip(self.replicas, answers)]
        refused = [st for st, _, _ in answers if st not in (0, 200)]
        ok = [st for st, _, _ in answers if st == 200]
        status = refused[0] if refused else (200 if ok else 502)
        return JSONResponse({"message": f"{len(ok)} of {len(answers)} replicas accepted", "replicas": results},
                            status)

    async def metrics_endpoint(self, request: Request) -> Response:
        ex = Exchange("/metrics", caller=self.caller(request))
        refused = _admin_only(ex.caller)
        if refused is not None:
            return self._answer(ex, refused)
        return self._answer(ex, Response(self.metrics.render(), media_type="text/plain; version=0.0.4"))


class StreamRelay:
    """One upstream event stream: forwarded event by event, its usage noted, closed exactly once.

    The usage chunk is dropped when only the gateway asked for it. :meth:`close` (idempotent) closes the
    upstream request and accounts for the request, whether the stream ended, broke, or was never read.
    """

    def __init__(self, upstream: httpx.Response, ex: Exchange, strip_usage: bool,
                 finish: Callable[[Exchange, int], None], first: bytes = b"",
                 rest: AsyncIterator[bytes] | None = None) -> None:
        self.upstream, self.ex, self.strip_usage, self._finish = upstream, ex, strip_usage, finish
        self.first, self.rest = first, rest if rest is not None else upstream.aiter_raw()
        self.status = 499  # the client went away before the end
        self.chunks = 0  # chunks with choices: one token each at vLLM's default stream interval
        self._closed = False

    async def _raw(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        async for chunk in self.rest:
            yield chunk

    async def events(self) -> AsyncIterator[bytes]:
        """The events; a stream that breaks off (or ends without ``data: [DONE]``) ends with an OpenAI-shape
        error event, which the ``openai`` client raises as ``APIError``. At ``data: [DONE]`` the upstream is
        closed and the request accounted for before the last event goes out, so a client that sends its
        next request at once finds its concurrency slot free."""
        splitter = EventSplitter()
        done = False
        try:
            async for chunk in self._raw():
                out = []
                for event in splitter.feed(chunk):
                    done = done or event.strip() == b"data: [DONE]"
                    data = event_data(event)
                    usage = usage_of(data)
                    if usage:
                        self.ex.prompt_tokens, self.ex.completion_tokens = usage
                    elif data and data.get("choices"):
                        self.chunks += 1
                    if not (self.strip_usage and is_usage_only(data)):
                        out.append(event)
                if done:  # the end for the client: free the tenant's slot and account before it sees it
                    self.status = 200
                    await self.close()
                    yield b"".join(out)
                    return
                if out:
                    yield b"".join(out)
            tail = splitter.rest()
            if tail:
                yield tail
            self.status = 200 if done else 502
        except httpx.HTTPError:
            self.status = 502
        if self.status == 502:
            logger.warning("upstream stream broke off (%s)", self.ex.path)
            yield STREAM_BROKE

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.upstream.aclose()
        if self.ex.prompt_tokens is None and self.chunks:  # cut off before vLLM's usage chunk: count what was sent
            self.ex.prompt_tokens, self.ex.completion_tokens = 0, self.chunks
        self._finish(self.ex, self.status)


class Relay(StreamingResponse):
    """A streamed answer that stops reading upstream as soon as the client disconnects.

    Starlette's ``StreamingResponse`` notices a disconnect only when its next write fails; here a task
    waits for ``http.disconnect`` and cancels the relay at once, which closes the upstream request (vLLM
    then aborts the generation) and accounts for what was streamed.
    """

    def __init__(self, relay: StreamRelay, media_type: str) -> None:
        super().__init__(relay.events(), status_code=200, media_type=media_type, headers={"cache-control": "no-cache"})
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def disconnected() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(disconnected)
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    pass  # the client is gone
                finally:
                    group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.relay.close()


async def _no_more() -> AsyncIterator[bytes]:
    return
    yield  # an async generator with nothing to give


def _unauthorized() -> Response:
    return error(401, "missing, unknown or revoked API key; send `Authorization: Bearer <key>`")


def _unreachable() -> Response:
    return error(502, "the model server did not answer; try again shortly")


def _admin_only(caller: Caller | None) -> Response | None:
    if caller is None:
        return _unauthorized()
    if caller.tenant is not None:
        return error(403, "this path needs the admin key")
    return None

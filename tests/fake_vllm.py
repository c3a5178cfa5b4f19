"""A stand-in for vLLM's OpenAI server (the routes the gateway uses), recording what reaches it.

Completions answer ``"tok0 tok1 ..."`` with ``max_tokens`` tokens (default 4); usage counts prompt
words. Streams send one SSE event per token (``delay`` seconds apart), then, with
``stream_options.include_usage``, vLLM's usage-only chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving.gateway.server import bind


@dataclass
class FakeVllm:
    models: list[str] = field(default_factory=lambda: ["base", "a1", "a2", "b1"])
    key: str | None = "internal"
    delay: float = 0.0
    linger: float = 0.0  # seconds a stream stays open after ``data: [DONE]`` (vLLM's body can end later)
    max_model_len: int = 4096  # larger max_tokens get 400, as from vLLM
    seen: list[dict[str, Any]] = field(default_factory=list)  # every request that reached us
    cancelled: list[str] = field(default_factory=list)  # streams whose client went away

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload, methods=["POST"]),
        ])

    def _authorized(self, request: Request) -> bool:
        return self.key is None or request.headers.get("authorization") == f"Bearer {self.key}"

    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        entry = {"path": request.url.path, "headers": dict(request.headers), "raw": raw}
        self.seen.append(entry)
        return entry

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def list_models(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "root": "/models/base" if m == "base" else f"/adapters/{m}",
             "parent": None if m == "base" else "base"} for m in self.models]})

    async def complete(self, request: Request) -> Response:
        entry = await self._record(request)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        body = json.loads(entry["raw"])
        model = body.get("model")
        if model not in self.models:
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                                           "param": "model", "code": 404}}, 404)
        n = body.get("max_tokens") or body.get("max_completion_tokens") or 4
        if not isinstance(n, int) or not 1 <= n <= self.max_model_len:
            return JSONResponse({"error": {"message": "bad max_tokens", "type": "BadRequestError", "param": None,
                                           "code": 400}}, 400)
        prompt = body.get("prompt") or " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": n,
                 "total_tokens": len(str(prompt).split()) + n}
        chat = request.url.path.endswith("chat/completions")
        if not body.get("stream"):
            await asyncio.sleep(self.delay * n)
            text = " ".join(f"tok{i}" for i in range(n))
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                {"index": 0, "text": text}
            return JSONResponse({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                 "model": model, "choices": [choice], "usage": usage})
        include = (body.get("stream_options") or {}).get("include_usage") is True

        async def events():
            try:
                for i in range(n):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    delta = {"index": 0, "delta": {"content": f"tok{i} "}} if chat else {"index": 0, "text": f"tok{i} "}
                    yield f"data: {json.dumps({'id': 'x', 'model': model, 'choices': [delta]})}\n\n"
                if include:
                    yield f"data: {json.dumps({'id': 'x', 'model': model, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                if self.linger:
                    await asyncio.sleep(self.linger)
            except (asyncio.CancelledError, GeneratorExit):
                self.cancelled.append(model)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    async def load(self, request: Request) -> Response:
        entry = await self._record(request)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        name = json.loads(entry["raw"])["lora_name"]
        if name in self.models:
            return JSONResponse({"error": {"message": f"already loaded: {name}", "type": "BadRequestError",
                                           "param": None, "code": 400}}, 400)
        self.models.append(name)
        return Response(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request) -> Response:
        entry = await self._record(request)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        name = json.loads(entry["raw"])["lora_name"]
        if name not in self.models:
            return JSONResponse({"error": {"message": f"LoRA adapter {name} does not exist", "type": "NotFoundError",
                                           "param": None, "code": 404}}, 404)
        self.models.remove(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.")


class ThreadServer:
    """An ASGI app on a free loopback port, served by uvicorn in a thread (``with`` it)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = bind("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                                    ws="none"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()

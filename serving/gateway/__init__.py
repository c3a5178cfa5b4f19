"""The tenant gateway: per-tenant keys, allow-lists, limits and usage in front of one vLLM server.

``pissa serve`` starts it when the serving manifest has a ``tenants:`` section: vLLM then listens on
loopback only (free port, random internal key) and the gateway is the only public listener.

Modules: :mod:`.config` (the manifest's ``gateway:`` and ``tenants:`` sections), :mod:`.keys` (the keys
file: hashes only), :mod:`.store` (SQLite: usage per tenant and day, runtime grants), :mod:`.limiter`
(rate, concurrency, daily tokens), :mod:`.sse` (server-sent events, pure), :mod:`.responses` (the
OpenAI error shape), :mod:`.metrics` (Prometheus), :mod:`.app` (the ASGI app), :mod:`.server`
(uvicorn in a thread), :mod:`.admin` (what ``pissa tenants`` calls).
"""

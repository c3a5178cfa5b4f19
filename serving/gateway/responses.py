"""Error answers in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` (as vLLM writes
them), so the ``openai`` client raises its usual typed exceptions (``AuthenticationError``,
``NotFoundError``, ``RateLimitError``, ...)."""

from __future__ import annotations

import json

from starlette.responses import Response

TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
         404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
         429: "RateLimitError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}


def error(status: int, message: str, *, param: str | None = None, retry_after: int | None = None) -> Response:
    body = {"error": {"message": message, "type": TYPES.get(status, "Error"), "param": param, "code": status}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def model_not_found(model: str) -> Response:
    """The one answer for a model the key may not call, whether or not it exists (vLLM's own words)."""
    return error(404, f"The model `{model}` does not exist.", param="model")

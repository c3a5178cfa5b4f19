"""Per-tenant admission: requests per minute (``limits``' moving window), concurrent requests, tokens per
UTC day, and the ``max_tokens`` cap. Pure decisions; the app turns a :class:`Refusal` into a response.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from serving.gateway.config import Limits, Tenant


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str
    retry_after: int | None = None  # seconds (the Retry-After header)


def seconds_to_utc_midnight(now: float | None = None) -> int:
    t = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    midnight = (t + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - t).total_seconds()))


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's own default for /v1/completions (chat: the context's room)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shape_problem(body: dict[str, object]) -> str | None:
    """Fields the gateway's accounting relies on must have their JSON types (vLLM would coerce ``"true"``
    or ``1`` to a bool, and the gateway would then not see a stream)."""
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        return "stream must be true or false"
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not all(
            options.get(k) is None or isinstance(options.get(k), bool)
            for k in ("include_usage", "continuous_usage_stats"))):
        return "stream_options must be an object whose include_usage and continuous_usage_stats are booleans"
    for field in ("max_tokens", "max_completion_tokens", "n", "best_of"):
        value = body.get(field)
        if value is not None and (not _int(value) or value < 1):  # type: ignore[operator]
            return f"{field} must be a positive integer"
    return None


def sequences(body: dict[str, object]) -> int:
    """How many sequences one request generates (``n``, or ``best_of`` when larger)."""
    return max(int(body.get("n") or 1), int(body.get("best_of") or 1))  # type: ignore[call-overload]


def max_tokens_problem(body: dict[str, object], limits: Limits) -> str | None:
    """Why the request's token request is refused (None: fine): a malformed field, or ``max_tokens``
    (``max_completion_tokens``) times the number of sequences above the tenant's cap."""
    problem = shape_problem(body)
    if problem or limits.max_tokens is None:
        return problem
    n = sequences(body)
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if value * n > limits.max_tokens:  # type: ignore[operator]
            times = f" × n={n}" if n > 1 else ""
            return f"{field} {value}{times} is above this key's cap of {limits.max_tokens}"
    if n > limits.max_tokens:
        return f"n={n} sequences of at least one token each is above this key's cap of {limits.max_tokens}"
    return None


def default_max_tokens(path: str, body: dict[str, object], limits: Limits) -> int | None:
    """The ``max_tokens`` to set when the request has none, so the cap holds (None: leave the request as
    is). Completions default to 16 tokens in vLLM, so only a smaller cap changes them."""
    if limits.max_tokens is None or body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None:
        return None
    per_sequence = max(1, limits.max_tokens // sequences(body))
    if path.endswith("/v1/completions") and per_sequence >= COMPLETIONS_DEFAULT_MAX_TOKENS:
        return None
    return per_sequence


class Admission:
    """Admits or refuses a tenant's request; :meth:`release` when it ends."""

    def __init__(self, tenants: tuple[Tenant, ...], tokens_today: Callable[[str], int]) -> None:
        from limits import RateLimitItemPerMinute, storage, strategies

        self._limits = {t.name: t.limits for t in tenants}
        self._rate = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._items = {t.name: RateLimitItemPerMinute(t.limits.requests_per_minute)
                       for t in tenants if t.limits.requests_per_minute}
        self._tokens_today = tokens_today
        self.active: Counter[str] = Counter()

    def admit(self, tenant: str) -> Refusal | None:
        """None and one more active request, or why not (nothing counted then)."""
        limits = self._limits[tenant]
        if limits.max_concurrent is not None and self.active[tenant] >= limits.max_concurrent:
            return Refusal(429, f"too many concurrent requests for this key (limit {limits.max_concurrent})",
                           "concurrency_limit_exceeded", 1)
        if limits.tokens_per_day is not None and self._tokens_today(tenant) >= limits.tokens_per_day:
            return Refusal(429, f"daily token budget of {limits.tokens_per_day} used up (resets at 00:00 UTC)",
                           "daily_tokens_exceeded", seconds_to_utc_midnight())
        item = self._items.get(tenant)
        if item is not None and not self._rate.hit(item, tenant):
            reset = self._rate.get_window_stats(item, tenant).reset_time
            return Refusal(429, f"rate limit of {limits.requests_per_minute} requests per minute reached",
                           "rate_limit_exceeded", max(1, math.ceil(reset - time.time())))
        self.active[tenant] += 1
        return None

    def release(self, tenant: str) -> None:
        self.active[tenant] -= 1

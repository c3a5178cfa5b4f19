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


def max_tokens_problem(body: dict[str, object], limits: Limits) -> str | None:
    """Why the request's ``max_tokens`` / ``max_completion_tokens`` is refused (None: fine)."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{field} must be an integer"
        if limits.max_tokens is not None and value > limits.max_tokens:
            return f"{field} {value} is above this key's cap of {limits.max_tokens}"
    return None


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

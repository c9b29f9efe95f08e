"""Per-tenant request rates, with the `limits` package: a moving window of `burst` requests over
`burst / rate` seconds, so a tenant may send `burst` requests at once and `rate` per second on
average. Reads (GET, HEAD) and writes (POST, DELETE: submissions, uploads, cancels) have their own
windows. The counters live in Redis when GRADLEAK_REDIS_URL is set, so that every API replica
counts the same requests, and in this process's memory otherwise.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from service.jobs.quotas import QuotaExceededError, Quotas
from service.settings import Settings

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_REFUSALS = 10_000


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.storage: Storage
        if settings.redis_url:
            url = "async+" + settings.redis_url if "://" in settings.redis_url else settings.redis_url
            self.storage = RedisStorage(
                url, implementation="redispy", key_prefix=f"{settings.redis_prefix}:ratelimit"
            )
        else:
            self.storage = MemoryStorage()
        self.limiter = MovingWindowRateLimiter(self.storage)
        # (tenant, kind, burst, window) -> when its window frees a slot: until then a refusal needs
        # no round trip to the counters, so a flooding tenant costs each replica little
        self._refused_until: dict[tuple[str, str, int, int], float] = {}

    async def hit(self, tenant: str, method: str, quotas: Quotas) -> None:
        """Count one request; QuotaExceededError (with when to retry) when the tenant is over its rate."""
        if method in READ_METHODS:
            kind, rate, burst = "read", quotas.rate_read_per_s, quotas.rate_read_burst
        else:
            kind, rate, burst = "write", quotas.rate_write_per_s, quotas.rate_write_burst
        window = max(1, math.ceil(burst / rate))
        refusal = (tenant, kind, burst, window)
        until = self._refused_until.get(refusal, 0.0)
        if until <= time.time():
            item = RateLimitItemPerSecond(burst, window)
            if await self.limiter.hit(item, tenant, kind):
                return
            until = (await self.limiter.get_window_stats(item, tenant, kind)).reset_time
            if len(self._refused_until) >= MAX_REFUSALS:
                self._refused_until.clear()
            self._refused_until[refusal] = until
        raise QuotaExceededError(
            f"tenant {tenant} sent more than {burst} {kind} requests in {window} s "
            f"(its rate is {rate:g} per second with bursts of {burst}); retry after the Retry-After delay",
            quota=f"rate_{kind}",
            limit=rate,
            retry_after_s=until - time.time(),
        )

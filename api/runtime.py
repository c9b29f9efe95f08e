"""What a running API process holds: settings, state store, artifact store, queue, housekeeper.

Opened in the app's lifespan and closed with it; routes reach it through api/deps.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.observability import Metrics
from api.ratelimit import RateLimiter
from service.jobs.budget import ProfileFn, Profiler
from service.jobs.keys import authenticate, digest
from service.jobs.maintenance import Housekeeper
from service.jobs.queue import JobQueue
from service.jobs.quotas import Quotas
from service.jobs.records import ApiKeyRecord
from service.jobs.state import StateStore, open_state_store
from service.jobs.uploads import Limits
from service.settings import Settings
from service.storage import ArtifactStore

log = logging.getLogger("gradleak.api")

QueueFactory = Callable[[Settings, StateStore, ArtifactStore], JobQueue]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_enabled(settings: Settings) -> bool:
    """Keys are required unless configured off, and off is allowed only on a loopback address."""
    if settings.auth_required is None:
        return not is_loopback(settings.host)
    if not settings.auth_required and not is_loopback(settings.host):
        raise ValueError(
            f"refusing to serve without API keys on {settings.host}: bind to 127.0.0.1, or set "
            "GRADLEAK_AUTH_REQUIRED=true and create keys with `gradleak keys create`"
        )
    return settings.auth_required


def default_queue(settings: Settings, state: StateStore, store: ArtifactStore) -> JobQueue:
    if settings.redis_url:
        from service.jobs.queue import ArqQueue

        return ArqQueue(settings, state)
    from service.jobs.embedded import EmbeddedQueue

    return EmbeddedQueue(settings, state, store)


class KeyCache:
    """Recent key lookups, so that a burst of status polls does not hit the store per request.
    A revoked key stops working within TTL_S."""

    TTL_S = 5.0
    MAX_ENTRIES = 10_000

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self._entries: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    def cached(self, token: str) -> tuple[bool, ApiKeyRecord | None]:
        hit = self._entries.get(digest(token))
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def lookup(self, token: str) -> ApiKeyRecord | None:
        record = authenticate(self.state, token)
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest(token)] = (time.monotonic() + self.TTL_S, record)
        return record


@dataclass
class Runtime:
    settings: Settings
    state: StateStore
    store: ArtifactStore
    queue: JobQueue
    metrics: Metrics
    auth: bool
    limits: Limits
    keys: KeyCache
    housekeeper: Housekeeper
    quotas: Quotas
    limiter: RateLimiter
    profiler: ProfileFn
    _catalog: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        metrics: Metrics,
        queue_factory: QueueFactory,
        profiler: ProfileFn | None = None,
    ) -> Runtime:
        from service.storage_s3 import make_store

        auth = auth_enabled(settings)
        state = await asyncio.to_thread(open_state_store, settings)
        store = make_store(settings)
        queue = queue_factory(settings, state, store)
        await queue.start()
        housekeeper = Housekeeper(state, store, queue, orphan_age_s=settings.retention_hours * 3600.0)
        housekeeper.start()
        if profiler is None:
            profiler = Profiler()
            profiler.warm()
        return cls(
            settings=settings,
            state=state,
            store=store,
            queue=queue,
            metrics=metrics,
            auth=auth,
            limits=Limits.from_settings(settings),
            keys=KeyCache(state),
            housekeeper=housekeeper,
            quotas=Quotas.from_settings(settings),
            limiter=RateLimiter(settings),
            profiler=profiler,
        )

    async def close(self) -> None:
        await self.housekeeper.stop()
        await self.queue.close()
        if isinstance(self.profiler, Profiler):
            self.profiler.close()
        self.state.close()

    def catalog(self) -> dict[str, Any]:
        """The registries' catalog, built once (it imports the engine)."""
        if self._catalog is None:
            from service.catalog import full_catalog

            self._catalog = full_catalog()
        return self._catalog

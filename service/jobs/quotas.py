"""Per-tenant quotas: request rates, running and queued jobs, stored bytes.

The server's settings give every tenant's defaults; an API key may carry overrides (set with
`gradleak keys create --quota name=value`), which apply to the requests made with that key.
Rates are enforced by the API (api/ratelimit.py, with the `limits` package); the job and storage
counts come from the state store, so every API replica and worker sees the same figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from service.errors import GradleakError
from service.jobs.state import StateStore
from service.settings import Settings


class QuotaExceededError(GradleakError):
    """A tenant is over a quota or rate limit; `retry_after_s` says when trying again may help."""

    def __init__(self, message: str, *, quota: str, limit: float, retry_after_s: float) -> None:
        self.quota, self.limit = quota, limit
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(message)


# How long a client told "too many jobs" should wait before asking again.
JOBS_RETRY_AFTER_S = 30.0
STORAGE_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True)
class Quotas:
    rate_read_per_s: float
    rate_read_burst: int
    rate_write_per_s: float
    rate_write_burst: int
    max_running_jobs: int
    max_queued_jobs: int
    max_stored_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def with_overrides(self, overrides: dict[str, Any] | None) -> Quotas:
        """These quotas with a key's overrides applied (unknown names were refused when the key
        was made; they are ignored here so that an old key never breaks a request)."""
        if not overrides:
            return self
        names = {f.name: f.type for f in fields(self)}
        known = {k: v for k, v in overrides.items() if k in names}
        return replace(self, **known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUOTA_NAMES = tuple(f.name for f in fields(Quotas))


def parse_overrides(items: list[str]) -> dict[str, float | int]:
    """`name=value` pairs (the CLI's --quota) checked against the quota names and types."""
    out: dict[str, float | int] = {}
    types = {f.name: f.type for f in fields(Quotas)}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise ValueError(f"--quota takes name=value with name one of: {', '.join(QUOTA_NAMES)}")
        try:
            number: float | int = float(value) if types[name] in ("float", float) else int(value)
        except ValueError:
            raise ValueError(f"--quota {name}: {value!r} is not a number") from None
        if number < 0 or (name.startswith("rate_") and number <= 0) or not math.isfinite(number):
            raise ValueError(f"--quota {name} must be a positive number, got {value!r}")
        out[name] = number
    return out


def check_job_quotas(state: StateStore, tenant: str, quotas: Quotas) -> None:
    """Refuse a new job while the tenant has its quota of waiting jobs."""
    waiting = state.count_waiting_jobs(tenant)
    if waiting >= quotas.max_queued_jobs:
        raise QuotaExceededError(
            f"tenant {tenant} has {waiting} jobs waiting to run; the quota is {quotas.max_queued_jobs}. "
            "Wait for some to finish, or cancel some",
            quota="max_queued_jobs",
            limit=quotas.max_queued_jobs,
            retry_after_s=JOBS_RETRY_AFTER_S,
        )


def check_storage_quota(state: StateStore, tenant: str, quotas: Quotas, incoming: int) -> None:
    """Refuse an upload that would take the tenant's stored bytes past its quota."""
    used = state.stored_bytes(tenant)
    if used + incoming > quotas.max_stored_bytes:
        raise QuotaExceededError(
            f"tenant {tenant} stores {used} bytes of uploads; this upload of {incoming} bytes would pass "
            f"the quota of {quotas.max_stored_bytes} bytes. Delete uploads you no longer need "
            "(DELETE /v1/models/{id}, /v1/updates/{id}, /v1/ground-truth/{id}) or wait for them to expire",
            quota="max_stored_bytes",
            limit=quotas.max_stored_bytes,
            retry_after_s=STORAGE_RETRY_AFTER_S,
        )

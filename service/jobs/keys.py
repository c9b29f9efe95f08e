"""API keys: random bearer tokens mapped to a tenant, stored only as their sha256 digest.

A key has 256 random bits, so a plain sha256 is enough (no password hashing needed: there is
nothing to guess); the digest is what the state store indexes and what a request is checked
against.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from service.jobs.records import KEY_PREFIX, ApiKeyRecord, check_tenant, new_id
from service.jobs.state import StateStore

TOKEN_PREFIX = "glk_"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(
    state: StateStore, tenant: str, name: str = "", quotas: dict[str, float | int] | None = None
) -> tuple[str, ApiKeyRecord]:
    """A new key for `tenant`: (the token, shown once; its record). `quotas` overrides the
    server's quotas for requests made with this key (service/jobs/quotas.py)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        id=new_id(KEY_PREFIX),
        tenant=check_tenant(tenant),
        name=name,
        digest=digest(token),
        prefix=token[: len(TOKEN_PREFIX) + 6],
        created_at=time.time(),
        quotas=quotas or None,
    )
    state.add_key(record)
    return token, record


def authenticate(state: StateStore, token: str) -> ApiKeyRecord | None:
    """The live key behind `token`, or None (unknown or revoked)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    record = state.find_key(digest(token))
    if record is None or record.revoked_at is not None:
        return None
    return record

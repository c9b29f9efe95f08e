"""Dependencies, as `Annotated` aliases the routes take as parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from api.runtime import Runtime
from service.errors import NotFoundError
from service.jobs.quotas import Quotas
from service.jobs.records import JOB_PREFIX, LOCAL_TENANT, ApiKeyRecord, JobRecord, is_id

bearer = HTTPBearer(auto_error=False, description="an API key (glk_...) from `gradleak keys create`")


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant, and its quotas with the key's overrides applied."""

    tenant: str
    quotas: Quotas


async def get_caller(
    request: Request,
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """Authenticate the request and count it against the tenant's rate (429 when over it)."""
    record = await _authenticate(rt, credentials)
    tenant = LOCAL_TENANT if record is None else record.tenant
    quotas = rt.quotas.with_overrides(None if record is None else record.quotas)
    await rt.limiter.hit(tenant, request.method, quotas)
    return Caller(tenant, quotas)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_tenant(caller: CallerDep) -> str:
    return caller.tenant


async def _authenticate(rt: Runtime, credentials: HTTPAuthorizationCredentials | None) -> ApiKeyRecord | None:
    """The caller's key; None when keys are not required (loopback)."""
    if not rt.auth:
        return None
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>' (create keys with `gradleak keys create`)",
            code="unauthorized",
            headers=challenge,
        )
    token = credentials.credentials
    known, record = rt.keys.cached(token)
    if not known:
        record = await run_in_threadpool(rt.keys.lookup, token)
    if record is None:
        raise ApiError(401, "invalid or revoked API key", code="unauthorized", headers=challenge)
    return record


Tenant = Annotated[str, Depends(get_tenant)]


async def get_job(job_id: str, tenant: Tenant, rt: RuntimeDep) -> JobRecord:
    """The tenant's job; any other id (another tenant's, malformed, unknown) is a 404."""
    if not is_id(job_id, JOB_PREFIX):
        raise NotFoundError(f"no job {job_id!r}")
    return await run_in_threadpool(rt.state.get_job, tenant, job_id)


OwnedJob = Annotated[JobRecord, Depends(get_job)]

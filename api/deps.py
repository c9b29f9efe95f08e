"""Dependencies, as `Annotated` aliases the routes take as parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from api.runtime import Runtime
from service.errors import NotFoundError
from service.jobs.records import JOB_PREFIX, LOCAL_TENANT, JobRecord, is_id

bearer = HTTPBearer(auto_error=False, description="an API key (glk_...) from `gradleak keys create`")


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_tenant(
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    if not rt.auth:
        return LOCAL_TENANT
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
    return record.tenant


Tenant = Annotated[str, Depends(get_tenant)]


async def get_job(job_id: str, tenant: Tenant, rt: RuntimeDep) -> JobRecord:
    """The tenant's job; any other id (another tenant's, malformed, unknown) is a 404."""
    if not is_id(job_id, JOB_PREFIX):
        raise NotFoundError(f"no job {job_id!r}")
    return await run_in_threadpool(rt.state.get_job, tenant, job_id)


OwnedJob = Annotated[JobRecord, Depends(get_job)]

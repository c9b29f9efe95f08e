"""What the routes of runs submitted as a spec share (federations, studies, generator training
runs): the tenant's record by id, a page of them, and the Idempotency-Key handling of a create.
Each resource keeps its own routes, so that its OpenAPI entries say what it is."""

from __future__ import annotations

from fastapi import Response
from fastapi.concurrency import run_in_threadpool

from api.errors import ApiError
from api.runtime import Runtime
from service.errors import NotFoundError
from service.jobs.records import JobRecord, JobStatus, RunKind, is_id


async def owned_run(rt: Runtime, tenant: str, run_id: str, prefix: str, noun: str) -> JobRecord:
    """The tenant's run `run_id` of id prefix `prefix`; any other id (another tenant's, malformed,
    unknown, of another kind) is a 404 that names `noun`."""
    if not is_id(run_id, prefix):
        raise NotFoundError(f"no {noun} {run_id!r}")
    return await run_in_threadpool(rt.state.get_job, tenant, run_id)


async def run_page(
    rt: Runtime, tenant: str, status: JobStatus | None, limit: int, cursor: str | None, prefix: str
) -> tuple[list[JobRecord], str | None]:
    """A page of the tenant's runs of one kind, newest first, and the cursor of the next page."""
    if cursor is not None and not is_id(cursor, prefix):
        raise ApiError(400, "invalid cursor: pass next_cursor from a previous page", code="invalid_cursor")
    items = await run_in_threadpool(rt.state.list_jobs, tenant, status, limit, cursor, prefix)
    return items, items[-1].id if len(items) == limit else None


def answer_create(
    response: Response,
    record: JobRecord,
    created: bool,
    request_hash: str,
    kind: RunKind,
    noun: str,
    path: str,
) -> None:
    """Refuse a key reused for another request (409); mark a replay; point Location at the run."""
    if not created and (record.request_hash != request_hash or record.kind != kind):
        raise ApiError(
            409,
            f"this Idempotency-Key was used for a different request; use a new key for a new {noun}",
            code="idempotency_conflict",
        )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"{path}/{record.id}"

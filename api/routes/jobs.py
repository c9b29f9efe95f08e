"""Jobs: submit (202 + Location; Idempotency-Key makes a retried POST return the same job), read,
list (newest first, by status, paginated with a cursor), cancel, follow (server-sent events),
and download artifacts (streamed, or redirected to a short-lived presigned URL on S3)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel

from api.deps import Caller, CallerDep, OwnedJob, RuntimeDep, Tenant
from api.errors import ApiError
from api.runtime import Runtime
from api.schemas import ArtifactList, ArtifactOut, JobCreate, JobList, JobOut, job_out
from service.errors import NotFoundError
from service.jobs.quotas import QuotaExceededError, check_job_quotas
from service.jobs.records import JOB_PREFIX, JobRecord, JobStatus, is_id
from service.jobs.submit import check_references, check_spec, get_upload_of_kind, new_job, spec_from_uploads
from service.jobs.types import CONTENT_TYPES, REPORT_HTML, REPORT_POLICY
from service.jobs.uploads import UpdateUpload

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

EVENT_POLL_S = 0.5
EVENT_RETRY_MS = 2000
IDEMPOTENCY_KEY = r"^[A-Za-z0-9._:-]{1,200}$"
# Reports are HTML built from the job: show them sandboxed, with nothing loaded from elsewhere.
REPORT_CSP = "sandbox; " + REPORT_POLICY
# Served by the API even from S3: an S3 response cannot carry a Content-Security-Policy header
# (S3 keeps Content-Type, -Disposition, -Encoding, -Language, Cache-Control and Expires, nothing
# else), so a presigned link would show the report without its sandbox.
NOT_PRESIGNED = frozenset({REPORT_HTML})  # also in a federation's folders: rounds/round-001/report.html


def _submit(
    rt: Runtime, caller: Caller, body: JobCreate, key: str | None, request_hash: str
) -> tuple[JobRecord, bool]:
    tenant = caller.tenant
    if body.spec is not None:
        spec = body.spec
    else:
        assert body.update_id is not None
        update = get_upload_of_kind(rt.state, tenant, body.update_id, "update", "update_id")
        model_id = body.model_id or UpdateUpload.model_validate(update.metadata).model_id
        model = get_upload_of_kind(rt.state, tenant, model_id, "model", "model_id")
        truth = None
        if body.ground_truth_id is not None:
            truth = get_upload_of_kind(
                rt.state, tenant, body.ground_truth_id, "ground_truth", "ground_truth_id"
            )
        spec = spec_from_uploads(
            model=model,
            update=update,
            ground_truth=truth,
            attack=body.attack,
            knowledge=body.knowledge,
            defenses=list(body.defenses),
            budget=body.budget,
            seed=body.seed,
            verdict=body.verdict,
        )
    spec = check_spec(spec, rt.limits, rt.profiler)
    check_references(spec, tenant, rt.state)
    try:
        check_job_quotas(rt.state, tenant, caller.quotas)
    except QuotaExceededError:
        if key is None or not _replayed(rt, tenant, key):
            raise
    job = new_job(
        spec,
        tenant,
        rt.settings,
        idempotency_key=key,
        request_hash=request_hash,
        max_running_jobs=caller.quotas.max_running_jobs,
    )
    return rt.state.create_job(job)


def _replayed(rt: Runtime, tenant: str, key: str, kind: str = JOB_PREFIX) -> bool:
    """Whether a recent run of `kind` (an id prefix) has this Idempotency-Key: a retry of it makes
    no new run, so the quota of waiting jobs does not apply (retries come soon after the first
    try, so recent runs suffice)."""
    return any(job.idempotency_key == key for job in rt.state.list_jobs(tenant, limit=200, kind=kind))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    summary="Submit a job",
    responses={
        409: {"description": "the Idempotency-Key was used for a different request"},
        422: {"description": "an invalid spec, or one over the memory budget (`estimate`)"},
        429: {"description": "over a rate limit or the quota of waiting jobs (Retry-After)"},
    },
)
async def create_job(
    body: JobCreate,
    rt: RuntimeDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(pattern=IDEMPOTENCY_KEY, description="a retried POST with the same key returns the same job"),
    ] = None,
) -> JobOut:
    """Check the job (names, knowledge, limits, uploads) and queue it. The response is the job,
    queued; follow it with GET on its Location or with its event stream."""
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    job, created = await run_in_threadpool(_submit, rt, caller, body, idempotency_key, request_hash)
    if not created and job.request_hash != request_hash:
        raise ApiError(
            409,
            "this Idempotency-Key was used for a different request; use a new key for a new job",
            code="idempotency_conflict",
        )
    if created:
        # Should this fail, the job is stored as queued and the reaper queues it again later.
        await rt.queue.enqueue(job)
        rt.metrics.jobs_submitted.inc()
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList, summary="List jobs")
async def list_jobs(
    rt: RuntimeDep,
    tenant: Tenant,
    job_status: Annotated[
        JobStatus | None, Query(alias="status", description="only jobs in this state")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobList:
    """The tenant's jobs, newest first."""
    if cursor is not None and not is_id(cursor, JOB_PREFIX):
        raise ApiError(400, "invalid cursor: pass next_cursor from a previous page", code="invalid_cursor")
    jobs = await run_in_threadpool(rt.state.list_jobs, tenant, job_status, limit, cursor)
    return JobList(items=[job_out(j) for j in jobs], next_cursor=jobs[-1].id if len(jobs) == limit else None)


@router.get("/{job_id}", response_model=JobOut, summary="A job")
async def get_job(job: OwnedJob) -> JobOut:
    """Status, progress (iteration, loss, best loss, elapsed), and when done, metrics and result."""
    return job_out(job)


@router.delete(
    "/{job_id}",
    response_model=JobOut,
    summary="Cancel a job",
    responses={
        202: {"model": JobOut, "description": "the running job was told to stop; it ends as cancelled"},
        409: {"description": "the job has already finished"},
    },
)
async def cancel_job(job: OwnedJob, rt: RuntimeDep, tenant: Tenant, response: Response) -> JobOut:
    """A waiting job is cancelled at once (200); a running one stops at its next iteration (202)."""
    return job_out(await cancel_record(job, rt, tenant, response))


async def cancel_record(job: JobRecord, rt: Runtime, tenant: str, response: Response) -> JobRecord:
    """Cancel a waiting record at once, flag a running one (202), refuse a finished one (409)."""
    if job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        job = await run_in_threadpool(rt.state.request_cancel, tenant, job.id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise ApiError(
            409, f"{job.id} has already {job.status.value}; there is nothing to cancel", code="conflict"
        )
    if job.status == JobStatus.RUNNING:
        await rt.queue.cancel(job)
        response.status_code = status.HTTP_202_ACCEPTED
    return job


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (server-sent events)",
    responses={200: {"description": "`status` and `progress` events, each with the job as data (JobOut)"}},
)
async def job_events(job: OwnedJob, rt: RuntimeDep, tenant: Tenant) -> AsyncIterator[ServerSentEvent]:
    """An event each time the job's status (`status`) or progress (`progress`) changes, with the
    job (JobOut) as its data; the stream ends after the final status."""
    async for event in record_events(job, rt, tenant, job_out):
        yield event


async def record_events(
    job: JobRecord, rt: Runtime, tenant: str, out: Callable[[JobRecord], BaseModel]
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent `status` and `progress` events of a stored record, `out(record)` as the data."""
    seen: tuple[JobStatus, object] | None = None
    sequence = 0
    while True:
        if seen is None or job.status != seen[0] or job.progress != seen[1]:
            sequence += 1
            kind = "status" if seen is None or job.status != seen[0] else "progress"
            data = out(job).model_dump(mode="json")
            yield ServerSentEvent(event=kind, id=str(sequence), data=data, retry=EVENT_RETRY_MS)
            seen = (job.status, job.progress)
        if job.status.terminal:
            return
        await asyncio.sleep(EVENT_POLL_S)
        try:
            job = await run_in_threadpool(rt.state.get_job, tenant, job.id)
        except NotFoundError:  # deleted by retention meanwhile
            return


def _presign(rt: Runtime, name: str, key: str) -> tuple[str | None, datetime | None]:
    if name.rsplit("/", 1)[-1] in NOT_PRESIGNED:
        return None, None
    ttl = timedelta(minutes=rt.settings.presign_minutes)
    url = rt.store.presigned_url(key, ttl)
    return url, None if url is None else datetime.now(UTC) + ttl


@router.get("/{job_id}/artifacts", response_model=ArtifactList, summary="A job's artifacts")
def list_artifacts(job: OwnedJob, rt: RuntimeDep) -> ArtifactList:
    """metrics.json, grid.png (truth vs reconstruction), reconstruction.safetensors, report.html."""
    return artifact_list(job, rt, f"/v1/jobs/{job.id}")


def artifact_list(job: JobRecord, rt: Runtime, base: str) -> ArtifactList:
    items = []
    for name, key in sorted(job.artifacts.items()):
        try:
            size = rt.store.size(key)
        except NotFoundError:
            continue
        url, expires = _presign(rt, name, key)
        items.append(
            ArtifactOut(
                name=name,
                size=size,
                content_type=content_type(name),
                url=f"{base}/artifacts/{name}",
                presigned_url=url,
                presigned_expires_at=expires,
            )
        )
    return ArtifactList(items=items)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the artifact's bytes",
            "content": {t: {} for t in sorted(set(CONTENT_TYPES.values()))},
        },
        307: {"description": "S3 stores: a redirect to a short-lived presigned URL"},
    },
)
def get_artifact(job: OwnedJob, name: str, rt: RuntimeDep) -> Response:
    return artifact_response(job, name, rt)


def artifact_response(job: JobRecord, name: str, rt: Runtime) -> Response:
    """An artifact's bytes streamed, or a redirect to a presigned URL on S3."""
    key = job.artifacts.get(name)
    if key is None:
        have = ", ".join(sorted(job.artifacts)) or "none yet"
        raise NotFoundError(f"{job.id} has no artifact {name!r}; it has: {have}")
    url, _ = _presign(rt, name, key)
    if url is not None:
        return RedirectResponse(
            url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers={"Cache-Control": "no-store"}
        )
    size = rt.store.size(key)
    disposition = "attachment" if name.endswith(".safetensors") else "inline"
    headers = {
        "Content-Length": str(size),
        "Cache-Control": "private, no-store",
        "Content-Disposition": f'{disposition}; filename="{job.id}-{name.replace("/", "-")}"',
    }
    if name.endswith(".html"):
        headers["Content-Security-Policy"] = REPORT_CSP
    return StreamingResponse(rt.store.iter_bytes(key), media_type=content_type(name), headers=headers)


def content_type(name: str) -> str:
    """By the artifact's file extension (a federation's artifacts sit in folders)."""
    suffix = name.rsplit(".", 1)[-1]
    return _BY_SUFFIX.get(suffix, "application/octet-stream")


_BY_SUFFIX = {name.rsplit(".", 1)[-1]: kind for name, kind in CONTENT_TYPES.items()} | {
    "csv": "text/csv; charset=utf-8",
    "svg": "image/svg+xml",
}

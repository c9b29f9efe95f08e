"""Studies: sweep settings of a job or a federation over many runs on the service's workers.

A study's points are ordinary jobs (or federations) queued like any other, so every worker shares
them; the study record works through them, then writes its table, plots and report. Progress
counts its points (done of total, with an ETA); cancelling a study cancels its unfinished points.
Scoped to the tenant like jobs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import Field

from api.deps import RuntimeDep, Tenant
from api.routes.jobs import IDEMPOTENCY_KEY, artifact_list, artifact_response, cancel_record, record_events
from api.routes.runs import answer_create, owned_run, run_page
from api.runtime import Runtime
from api.schemas import ArtifactList, Input, Output, RunOut, _run_fields
from service.errors import NotFoundError
from service.jobs.records import RUNNABLE, STUDY_PREFIX, JobRecord, JobStatus
from service.studies.spec import StudyPlan, StudySpec

router = APIRouter(prefix="/v1/studies", tags=["studies"])


class StudyCreate(Input):
    spec: StudySpec


class StudyPoints(Output):
    total: int
    done: int = Field(description="finished points: succeeded, failed or cancelled")
    succeeded: int
    failed: int
    cancelled: int
    running: int
    waiting: int


class StudyPointOut(Output):
    index: int
    id: str = Field(description="the point's job (job_...) or federation (fed_...)")
    values: dict[str, Any]
    seed: int
    status: JobStatus


class StudyOut(RunOut):
    kind: Literal["job", "federation"] = Field(description="what each point runs")
    points: StudyPoints
    eta_s: float | None = Field(
        description="seconds left at the study's pace so far; null before a point ends"
    )
    items: list[StudyPointOut] = Field(description="every point: its axis values, seed, record and status")
    result: dict[str, Any] | None = Field(description="when done: point counts by status, columns, timings")
    spec: StudySpec


class StudyList(Output):
    items: list[StudyOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


def study_out(study: JobRecord, points: list[JobRecord]) -> StudyOut:
    plan = StudyPlan.model_validate_json(study.spec_json)
    by_id = {p.id: p for p in points}
    statuses = [by_id[p.id].status if p.id in by_id else JobStatus.CANCELLED for p in plan.points]
    done = sum(s.terminal for s in statuses)
    total = len(plan.points)
    eta = None
    if study.started_at is not None and 0 < done < total and not study.status.terminal:
        eta = (time.time() - study.started_at) / done * (total - done)
    return StudyOut(
        **_run_fields(study, f"/v1/studies/{study.id}"),
        kind=plan.study.kind,
        points=StudyPoints(
            total=total,
            done=done,
            succeeded=statuses.count(JobStatus.SUCCEEDED),
            failed=statuses.count(JobStatus.FAILED),
            cancelled=statuses.count(JobStatus.CANCELLED),
            running=statuses.count(JobStatus.RUNNING),
            waiting=sum(s in RUNNABLE for s in statuses),
        ),
        eta_s=eta,
        items=[
            StudyPointOut(index=p.index, id=p.id, values=p.values, seed=p.seed, status=s)
            for p, s in zip(plan.points, statuses, strict=True)
        ],
        result=study.manifest,
        spec=plan.study,
    )


def _points(rt: Runtime, study: JobRecord) -> list[JobRecord]:
    out = []
    for p in StudyPlan.model_validate_json(study.spec_json).points:
        try:
            out.append(rt.state.get_job(study.tenant, p.id))
        except NotFoundError:  # deleted by retention before the study
            continue
    return out


def _out(rt: Runtime, study: JobRecord) -> StudyOut:
    return study_out(study, _points(rt, study))


async def get_study(study_id: str, tenant: Tenant, rt: RuntimeDep) -> JobRecord:
    """The tenant's study; any other id (another tenant's, malformed, unknown) is a 404."""
    return await owned_run(rt, tenant, study_id, STUDY_PREFIX, "study")


OwnedStudy = Annotated[JobRecord, Depends(get_study)]


def _submit(
    rt: Runtime, tenant: str, body: StudyCreate, key: str | None, request_hash: str
) -> tuple[JobRecord, list[JobRecord], bool]:
    from service.federations.checks import check_federation, check_initial_weights
    from service.federations.spec import FederationSpec
    from service.jobs.submit import check_references, check_spec
    from service.studies.submit import create_study

    def check(spec: Any) -> Any:
        if isinstance(spec, FederationSpec):
            spec = check_federation(spec, rt.limits)
            check_initial_weights(spec, tenant, rt.state)
            return spec
        spec = check_spec(spec, rt.limits)
        check_references(spec, tenant, rt.state)
        return spec

    return create_study(
        body.spec, tenant, rt.settings, rt.state, check=check, idempotency_key=key, request_hash=request_hash
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyOut,
    summary="Start a study",
    responses={409: {"description": "the Idempotency-Key was used for a different request"}},
)
async def create(
    body: StudyCreate,
    rt: RuntimeDep,
    tenant: Tenant,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=IDEMPOTENCY_KEY, description="a retried POST with the same key returns the same study"
        ),
    ] = None,
) -> StudyOut:
    """Expand the axes, check every point as a job (or federation) and the study's size against the
    limits, and queue the study and its points; follow it with GET on its Location."""
    from service.studies.submit import enqueue_study

    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    record, points, created = await run_in_threadpool(
        _submit, rt, tenant, body, idempotency_key, request_hash
    )
    answer_create(response, record, created, request_hash, "study", "study", "/v1/studies")
    if created:
        await enqueue_study(rt.queue, record, points)
    return study_out(record, points)


@router.get("", response_model=StudyList, summary="List studies")
async def list_studies(
    rt: RuntimeDep,
    tenant: Tenant,
    run_status: Annotated[
        JobStatus | None, Query(alias="status", description="only those in this state")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> StudyList:
    """The tenant's studies, newest first."""
    items, next_cursor = await run_page(rt, tenant, run_status, limit, cursor, STUDY_PREFIX)
    out = [await run_in_threadpool(_out, rt, s) for s in items]
    return StudyList(items=out, next_cursor=next_cursor)


@router.get("/{study_id}", response_model=StudyOut, summary="A study")
async def get_one(study: OwnedStudy, rt: RuntimeDep) -> StudyOut:
    """Status, points done of total with an ETA, every point's status; when done, the result."""
    return await run_in_threadpool(_out, rt, study)


@router.delete(
    "/{study_id}",
    response_model=StudyOut,
    summary="Cancel a study",
    responses={
        202: {
            "model": StudyOut,
            "description": "told to stop; its running points stop, the rest are cancelled",
        },
        409: {"description": "the study has already finished"},
    },
)
async def cancel(study: OwnedStudy, rt: RuntimeDep, tenant: Tenant, response: Response) -> StudyOut:
    """Cancel the study and each of its unfinished points; finished points keep their results."""
    study = await cancel_record(study, rt, tenant, response)
    for point in await run_in_threadpool(_points, rt, study):
        if not point.status.terminal:
            point = await run_in_threadpool(rt.state.request_cancel, tenant, point.id)
            if point.status == JobStatus.RUNNING:
                await rt.queue.cancel(point)
    return await run_in_threadpool(_out, rt, study)


@router.get(
    "/{study_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a study (server-sent events)",
    responses={200: {"description": "`status` and `progress` events, each with the study as data"}},
)
async def events(study: OwnedStudy, rt: RuntimeDep, tenant: Tenant) -> AsyncIterator[ServerSentEvent]:
    async for event in record_events(study, rt, tenant, lambda s: _out(rt, s)):
        yield event


@router.get("/{study_id}/artifacts", response_model=ArtifactList, summary="A study's artifacts")
def artifacts(study: OwnedStudy, rt: RuntimeDep) -> ArtifactList:
    """table.csv, table.json, plots/<axis>.png and .svg, report.html, metrics.json (when done)."""
    return artifact_list(study, rt, f"/v1/studies/{study.id}")


@router.get(
    "/{study_id}/artifacts/{name:path}",
    summary="Download a study's artifact",
    response_class=StreamingResponse,
    responses={307: {"description": "S3 stores: a redirect to a short-lived presigned URL"}},
)
def artifact(study: OwnedStudy, name: str, rt: RuntimeDep) -> Response:
    return artifact_response(study, name, rt)

"""Federations: train a model over FL rounds on the service's workers, with accuracy and IGSA per
round and audits of chosen rounds; one long queued run per federation, with per-round progress,
cancel (within a round), events and artifacts, scoped to the tenant like jobs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.deps import RuntimeDep, Tenant
from api.routes.jobs import IDEMPOTENCY_KEY, artifact_list, artifact_response, cancel_record, record_events
from api.routes.runs import answer_create, owned_run, run_page
from api.runtime import Runtime
from api.schemas import ArtifactList, FederationCreate, FederationList, FederationOut, federation_out
from service.jobs.records import FEDERATION_PREFIX, JobRecord, JobStatus

router = APIRouter(prefix="/v1/federations", tags=["federations"])


async def get_federation(federation_id: str, tenant: Tenant, rt: RuntimeDep) -> JobRecord:
    """The tenant's federation; any other id (another tenant's, malformed, unknown) is a 404."""
    return await owned_run(rt, tenant, federation_id, FEDERATION_PREFIX, "federation")


OwnedFederation = Annotated[JobRecord, Depends(get_federation)]


def _submit(
    rt: Runtime, tenant: str, body: FederationCreate, key: str | None, request_hash: str
) -> tuple[JobRecord, bool]:
    from service.federations.checks import check_federation, check_initial_weights
    from service.jobs.submit import new_job

    spec = check_federation(body.spec, rt.limits, rt.profiler)
    check_initial_weights(spec, tenant, rt.state)
    return rt.state.create_job(
        new_job(spec, tenant, rt.settings, idempotency_key=key, request_hash=request_hash)
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FederationOut,
    summary="Start a federation",
    responses={409: {"description": "the Idempotency-Key was used for a different request"}},
)
async def create_federation(
    body: FederationCreate,
    rt: RuntimeDep,
    tenant: Tenant,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(pattern=IDEMPOTENCY_KEY, description="a retried POST with the same key returns the same run"),
    ] = None,
) -> FederationOut:
    """Check the federation (names, knowledge, partition, limits) and queue it; follow it with GET on
    its Location or its event stream. Only the bundled photo-patch task is trained on here."""
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    record, created = await run_in_threadpool(_submit, rt, tenant, body, idempotency_key, request_hash)
    answer_create(response, record, created, request_hash, "federation", "federation", "/v1/federations")
    if created:
        await rt.queue.enqueue(record)
    return federation_out(record)


@router.get("", response_model=FederationList, summary="List federations")
async def list_federations(
    rt: RuntimeDep,
    tenant: Tenant,
    run_status: Annotated[
        JobStatus | None, Query(alias="status", description="only those in this state")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> FederationList:
    """The tenant's federations, newest first."""
    items, next_cursor = await run_page(rt, tenant, run_status, limit, cursor, FEDERATION_PREFIX)
    return FederationList(items=[federation_out(f) for f in items], next_cursor=next_cursor)


@router.get("/{federation_id}", response_model=FederationOut, summary="A federation")
async def get_one(federation: OwnedFederation) -> FederationOut:
    """Status and progress (round r of R, with its accuracy and IGSA); when done, every round."""
    return federation_out(federation)


@router.delete(
    "/{federation_id}",
    response_model=FederationOut,
    summary="Cancel a federation",
    responses={
        202: {"model": FederationOut, "description": "told to stop; it ends, cancelled, within a round"},
        409: {"description": "the federation has already finished"},
    },
)
async def cancel(
    federation: OwnedFederation, rt: RuntimeDep, tenant: Tenant, response: Response
) -> FederationOut:
    """A waiting federation is cancelled at once (200); a running one stops within its round (202),
    keeping the rounds it finished."""
    return federation_out(await cancel_record(federation, rt, tenant, response))


@router.get(
    "/{federation_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a federation (server-sent events)",
    responses={200: {"description": "`status` and `progress` events, each with the federation as data"}},
)
async def events(
    federation: OwnedFederation, rt: RuntimeDep, tenant: Tenant
) -> AsyncIterator[ServerSentEvent]:
    async for event in record_events(federation, rt, tenant, federation_out):
        yield event


@router.get("/{federation_id}/artifacts", response_model=ArtifactList, summary="A federation's artifacts")
def artifacts(federation: OwnedFederation, rt: RuntimeDep) -> ArtifactList:
    """rounds.csv, rounds.json, rounds.png, report.html, metrics.json, checkpoints/round-NNN.safetensors
    and each audited round's rounds/round-NNN/{grid.png, metrics.json, reconstruction.safetensors,
    report.html}."""
    return artifact_list(federation, rt, f"/v1/federations/{federation.id}")


@router.get(
    "/{federation_id}/artifacts/{name:path}",
    summary="Download a federation's artifact",
    response_class=StreamingResponse,
    responses={307: {"description": "S3 stores: a redirect to a short-lived presigned URL"}},
)
def artifact(federation: OwnedFederation, name: str, rt: RuntimeDep) -> Response:
    return artifact_response(federation, name, rt)

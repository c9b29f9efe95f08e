"""Generator training runs: train a DCGAN for the generative attacks (knowledge level 2) on the
service's workers, a GPU worker's device when it has one. One queued run per generator, with
progress (step of steps, losses, ETA), cancel, events and artifacts (sample grids per checkpoint,
the generator so far, the training state), scoped to the tenant like jobs. A run whose worker dies
continues from its last checkpoint; a run that succeeds stores its generator as the tenant's
generator upload (`generator_id`), ready for `gias`/`ggl` jobs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.deps import Caller, CallerDep, RuntimeDep, Tenant
from api.routes.jobs import (
    IDEMPOTENCY_KEY,
    _replayed,
    artifact_list,
    artifact_response,
    cancel_record,
    record_events,
)
from api.routes.runs import answer_create, owned_run, run_page
from api.runtime import Runtime
from api.schemas import (
    ArtifactList,
    GeneratorTrainingCreate,
    GeneratorTrainingList,
    GeneratorTrainingOut,
    training_out,
)
from service.jobs.quotas import QuotaExceededError, check_job_quotas
from service.jobs.records import TRAINING_PREFIX, JobRecord, JobStatus

router = APIRouter(prefix="/v1/generator-trainings", tags=["generators"])


async def get_training(training_id: str, tenant: Tenant, rt: RuntimeDep) -> JobRecord:
    """The tenant's training run; any other id (another tenant's, malformed, unknown) is a 404."""
    return await owned_run(rt, tenant, training_id, TRAINING_PREFIX, "generator training run")


OwnedTraining = Annotated[JobRecord, Depends(get_training)]


def _submit(
    rt: Runtime, caller: Caller, body: GeneratorTrainingCreate, key: str | None, request_hash: str
) -> tuple[JobRecord, bool]:
    from service.jobs.submit import check_generator_training, new_job

    spec = check_generator_training(body.spec, caller.tenant, rt.state, rt.settings)
    try:
        check_job_quotas(rt.state, caller.tenant, caller.quotas)
    except QuotaExceededError:
        if key is None or not _replayed(rt, caller.tenant, key, TRAINING_PREFIX):
            raise
    return rt.state.create_job(
        new_job(
            spec,
            caller.tenant,
            rt.settings,
            idempotency_key=key,
            request_hash=request_hash,
            max_running_jobs=caller.quotas.max_running_jobs,
        )
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GeneratorTrainingOut,
    summary="Train a generator",
    responses={
        409: {"description": "the Idempotency-Key was used for a different request"},
        422: {"description": "an invalid spec, or an image set that does not fit it"},
        429: {"description": "over a rate limit or the quota of waiting jobs (Retry-After)"},
    },
)
async def create_training(
    body: GeneratorTrainingCreate,
    rt: RuntimeDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(pattern=IDEMPOTENCY_KEY, description="a retried POST with the same key returns the same run"),
    ] = None,
) -> GeneratorTrainingOut:
    """Check the spec (its image set is the tenant's, labelled if the generator is conditional;
    the time limit within the server's) and queue the run; follow it with GET on its Location or
    its event stream. When it succeeds, `generator_id` names the generator upload it made."""
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    record, created = await run_in_threadpool(_submit, rt, caller, body, idempotency_key, request_hash)
    path = "/v1/generator-trainings"
    answer_create(response, record, created, request_hash, "generator_training", "training run", path)
    if created:
        await rt.queue.enqueue(record)
    return training_out(record)


@router.get("", response_model=GeneratorTrainingList, summary="List generator training runs")
async def list_trainings(
    rt: RuntimeDep,
    tenant: Tenant,
    run_status: Annotated[
        JobStatus | None, Query(alias="status", description="only those in this state")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> GeneratorTrainingList:
    """The tenant's training runs, newest first."""
    items, next_cursor = await run_page(rt, tenant, run_status, limit, cursor, TRAINING_PREFIX)
    return GeneratorTrainingList(items=[training_out(t) for t in items], next_cursor=next_cursor)


@router.get("/{training_id}", response_model=GeneratorTrainingOut, summary="A generator training run")
async def get_one(training: OwnedTraining) -> GeneratorTrainingOut:
    """Status and progress (step of steps, the last losses, steps/s and ETA); when done, the
    training summary and the generator upload it made."""
    return training_out(training)


@router.delete(
    "/{training_id}",
    response_model=GeneratorTrainingOut,
    summary="Cancel a generator training run",
    responses={
        202: {
            "model": GeneratorTrainingOut,
            "description": "told to stop; it ends, cancelled, within a step",
        },
        409: {"description": "the run has already finished"},
    },
)
async def cancel(
    training: OwnedTraining, rt: RuntimeDep, tenant: Tenant, response: Response
) -> GeneratorTrainingOut:
    """A waiting run is cancelled at once (200); a running one checkpoints and stops (202),
    keeping its artifacts (generator.safetensors is the generator so far) and making no upload."""
    return training_out(await cancel_record(training, rt, tenant, response))


@router.get(
    "/{training_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a generator training run (server-sent events)",
    responses={200: {"description": "`status` and `progress` events, each with the run as data"}},
)
async def events(training: OwnedTraining, rt: RuntimeDep, tenant: Tenant) -> AsyncIterator[ServerSentEvent]:
    async for event in record_events(training, rt, tenant, training_out):
        yield event


@router.get("/{training_id}/artifacts", response_model=ArtifactList, summary="A training run's artifacts")
def artifacts(training: OwnedTraining, rt: RuntimeDep) -> ArtifactList:
    """generator.safetensors, samples.png (the last checkpoint's sample grid), samples/step-NNNNNNN.png
    (one grid per checkpoint), history.json (losses over steps), training.json (the summary) and
    checkpoint/{state.json, training.safetensors} (what a resumed run continues from)."""
    return artifact_list(training, rt, f"/v1/generator-trainings/{training.id}")


@router.get(
    "/{training_id}/artifacts/{name:path}",
    summary="Download a training run's artifact",
    response_class=StreamingResponse,
    responses={307: {"description": "S3 stores: a redirect to a short-lived presigned URL"}},
)
def artifact(training: OwnedTraining, name: str, rt: RuntimeDep) -> Response:
    return artifact_response(training, name, rt)

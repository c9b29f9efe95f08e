"""From a study spec to stored records: refuse a study over the limits with its count, expand and
check every point as the service checks a job or a federation, and make the records (the points
first, so that a stored study never names a point that does not exist)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from service.errors import SpecError
from service.jobs.queue import JobQueue
from service.jobs.records import STUDY_PREFIX, JobRecord, new_id
from service.jobs.state import StateStore
from service.jobs.submit import new_job
from service.settings import Settings
from service.studies.spec import PlannedPoint, StudyPlan, StudySpec, expand

Check = Callable[[Any], Any]


def check_study(study: StudySpec, settings: Settings) -> StudySpec:
    """Refuse a study over the tenant's limits, with its count; fill in the default time limit."""
    if study.count() > settings.max_study_points:
        raise SpecError(
            f"the study has {study.describe_count()}; this server's limit is "
            f"{settings.max_study_points} points per study: use fewer values or seeds"
        )
    if study.time_limit_s is None:
        limit = min(settings.default_study_time_limit_s, settings.max_study_time_limit_s)
        return study.model_copy(update={"time_limit_s": limit})
    if study.time_limit_s > settings.max_study_time_limit_s:
        raise SpecError(
            f"time_limit_s is {study.time_limit_s:g} s; this server's limit is "
            f"{settings.max_study_time_limit_s:g} s per study"
        )
    return study


def create_study(
    study: StudySpec,
    tenant: str,
    settings: Settings,
    state: StateStore,
    *,
    check: Check | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[JobRecord, list[JobRecord], bool]:
    """Store a study and its points: (study, points, created). `check(spec)` returns a point's
    spec with the server's checks passed and defaults filled in (the service's job/federation
    checks); every point is checked before any record is made."""
    study = check_study(study, settings)
    points = expand(study)
    specs = [p.spec if check is None else _checked(check, p.spec, p.values, p.seed) for p in points]
    records = [new_job(spec, tenant, settings) for spec in specs]
    for record in records:
        state.create_job(record)
    plan = StudyPlan(
        study=study,
        points=[
            PlannedPoint(index=p.index, id=r.id, values=p.values, seed=p.seed)
            for p, r in zip(points, records, strict=True)
        ],
    )
    now = time.time()
    record = JobRecord(
        id=new_id(STUDY_PREFIX),
        tenant=tenant,
        spec_json=plan.to_json(),
        created_at=now,
        updated_at=now,
        expires_at=now + settings.retention_hours * 3600.0,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    stored, created = state.create_job(record)
    if not created:  # a replayed request: the first one's points are the study's
        for r in records:
            state.delete_job(r.id)
        plan = StudyPlan.model_validate_json(stored.spec_json)
        return stored, [state.get_job(tenant, p.id) for p in plan.points], False
    return stored, records, True


def _checked(check: Check, spec: Any, values: dict[str, Any], seed: int) -> Any:
    try:
        return check(spec)
    except SpecError as e:
        where = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "base"
        raise SpecError(f"study point {where} (seed {seed}): {e}") from None


def plan_of(record: JobRecord) -> StudyPlan:
    return StudyPlan.model_validate_json(record.spec_json)


async def enqueue_study(queue: JobQueue, study: JobRecord, points: list[JobRecord]) -> None:
    """Queue the study (it works through its points and then aggregates) and every point, so that
    any worker may take any point."""
    await queue.enqueue(study)
    for point in points:
        await queue.enqueue(point)

"""The state store contract, run against SQLite and Redis alike."""

from __future__ import annotations

import time

import pytest
from jobtools import make_job, upload

from service.errors import NotFoundError
from service.jobs.keys import authenticate, create_key, digest
from service.jobs.records import (
    MAX_ATTEMPTS,
    JobError,
    JobProgress,
    JobStatus,
    new_id,
)
from service.jobs.state import StateStore
from service.jobs.submit import new_job
from service.settings import Settings
from service.specs import JobSpec

LOST = JobError(code="worker_lost", message="the worker stopped responding")


def test_keys_are_stored_as_digests_and_revocable(state: StateStore) -> None:
    token, record = create_key(state, "acme", "ci")
    assert token.startswith("glk_") and token not in record.model_dump_json()
    assert record.digest == digest(token)
    assert authenticate(state, token) == record
    assert authenticate(state, token + "x") is None
    assert [k.id for k in state.list_keys()] == [record.id]
    revoked = state.revoke_key(record.id)
    assert revoked.revoked_at is not None
    assert authenticate(state, token) is None
    assert state.revoke_key(record.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(NotFoundError):
        state.revoke_key("key_" + "0" * 32)


def test_create_key_refuses_bad_tenant_names(state: StateStore) -> None:
    with pytest.raises(ValueError, match="invalid tenant"):
        create_key(state, "../etc")


def test_uploads_are_scoped_to_their_tenant(state: StateStore) -> None:
    mine = upload("acme")
    state.add_upload(mine)
    assert state.get_upload("acme", mine.id) == mine
    with pytest.raises(NotFoundError):
        state.get_upload("other", mine.id)
    with pytest.raises(NotFoundError):
        state.delete_upload("other", mine.id)
    assert state.delete_upload("acme", mine.id) == mine
    with pytest.raises(NotFoundError):
        state.get_upload("acme", mine.id)


def test_expired_uploads(state: StateStore) -> None:
    old, new = upload(expires_in=-1.0), upload(expires_in=3600.0)
    state.add_upload(old)
    state.add_upload(new)
    assert [u.id for u in state.expired_uploads(time.time())] == [old.id]


def test_uploads_of_a_kind_are_listed_per_tenant_newest_first(state: StateStore) -> None:
    gens = [upload("acme").model_copy(update={"id": new_id("gen"), "kind": "generator"}) for _ in range(3)]
    for record in [
        *gens,
        upload("acme"),
        upload("other").model_copy(update={"id": new_id("gen"), "kind": "generator"}),
    ]:
        state.add_upload(record)
    assert [u.id for u in state.list_uploads("acme", "generator")] == [g.id for g in gens[::-1]]
    assert [u.id for u in state.list_uploads("acme", "generator", limit=2)] == [g.id for g in gens[::-1][:2]]
    assert len(state.list_uploads("other", "generator")) == 1
    assert [u.kind for u in state.list_uploads("acme", "model")] == ["model"]
    state.delete_upload("acme", gens[0].id)
    assert [u.id for u in state.list_uploads("acme", "generator")] == [gens[2].id, gens[1].id]


def test_jobs_are_scoped_listed_newest_first_and_paginated(state: StateStore, settings: Settings) -> None:
    ids = [make_job(state, settings).id for _ in range(5)]
    other = make_job(state, settings, tenant="other")
    assert state.get_job("acme", ids[0]).id == ids[0]
    assert state.get_job(None, other.id).tenant == "other"
    with pytest.raises(NotFoundError):
        state.get_job("acme", other.id)

    first = state.list_jobs("acme", limit=2)
    assert [j.id for j in first] == ids[::-1][:2]
    rest = state.list_jobs("acme", limit=10, before=first[-1].id)
    assert [j.id for j in rest] == ids[::-1][2:]
    assert all(j.tenant == "acme" for j in first + rest)


def test_list_filters_by_status(state: StateStore, settings: Settings) -> None:
    a, b = make_job(state, settings), make_job(state, settings)
    state.request_cancel("acme", a.id)
    assert [j.id for j in state.list_jobs("acme", JobStatus.CANCELLED)] == [a.id]
    assert [j.id for j in state.list_jobs("acme", JobStatus.QUEUED)] == [b.id]
    counts = state.count_by_status()
    assert counts[JobStatus.CANCELLED] == 1 and counts[JobStatus.QUEUED] == 1


def test_idempotency_key_returns_the_first_job(state: StateStore, settings: Settings) -> None:
    first = make_job(state, settings, idempotency_key="k1", request_hash="h")
    again = new_job(JobSpec.model_validate_json(first.spec_json), "acme", settings, idempotency_key="k1")
    job, created = state.create_job(again)
    assert not created and job.id == first.id
    elsewhere, created = state.create_job(again.model_copy(update={"tenant": "other"}))
    assert created and elsewhere.id == again.id  # keys are per tenant


def test_claim_heartbeat_progress_finish(state: StateStore, settings: Settings) -> None:
    job = make_job(state, settings)
    running = state.claim(job.id, "w1", lease_s=30)
    assert running is not None and running.status == JobStatus.RUNNING and running.attempts == 1
    assert state.claim(job.id, "w2", lease_s=30) is None  # one worker at a time
    beat = state.heartbeat(job.id, "w1", 30)
    assert beat.owned and not beat.cancel_requested
    assert not state.heartbeat(job.id, "w2", 30).owned
    progress = JobProgress(stage="attack", iteration=3, total=10, loss=0.5, best_loss=0.4)
    assert state.set_progress(job.id, "w1", progress)
    assert not state.set_progress(job.id, "w2", progress)
    assert state.get_job("acme", job.id).progress == progress
    assert state.finish(job.id, "w2", JobStatus.SUCCEEDED) is None
    done = state.finish(
        job.id, "w1", JobStatus.SUCCEEDED, manifest={"metrics": {"psnr": 1.0}}, artifacts={"a": "k"}
    )
    assert done is not None and done.status == JobStatus.SUCCEEDED
    assert done.manifest == {"metrics": {"psnr": 1.0}} and done.artifacts == {"a": "k"}
    assert done.finished_at is not None and done.lease_expires_at is None
    assert state.claim(job.id, "w1", 30) is None
    with pytest.raises(ValueError):
        state.finish(job.id, "w1", JobStatus.RUNNING)


def test_cancel_waiting_and_running_jobs(state: StateStore, settings: Settings) -> None:
    waiting = make_job(state, settings)
    assert state.request_cancel("acme", waiting.id).status == JobStatus.CANCELLED
    assert state.claim(waiting.id, "w", 30) is None

    running = make_job(state, settings)
    state.claim(running.id, "w", 30)
    flagged = state.request_cancel("acme", running.id)
    assert flagged.status == JobStatus.RUNNING and flagged.cancel_requested
    assert state.heartbeat(running.id, "w", 30).cancel_requested
    with pytest.raises(NotFoundError):
        state.request_cancel("other", running.id)


def test_release_retries_then_fails(state: StateStore, settings: Settings) -> None:
    job = make_job(state, settings)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert state.runnable(10)[0].id == job.id
        assert state.claim(job.id, f"w{attempt}", 30) is not None
        assert state.release(job.id, "someone-else", LOST) is None
        released = state.release(job.id, f"w{attempt}", LOST)
        assert released is not None
    assert released is not None and released.status == JobStatus.FAILED
    assert released.error is not None and "gave up after 3 tries" in released.error.message
    assert state.runnable(10) == []


def test_release_of_a_cancelled_job_cancels_it(state: StateStore, settings: Settings) -> None:
    job = make_job(state, settings)
    state.claim(job.id, "w", 30)
    state.request_cancel("acme", job.id)
    released = state.release(job.id, "w", LOST)
    assert released is not None and released.status == JobStatus.CANCELLED


def test_reaper_release_needs_an_expired_lease(state: StateStore, settings: Settings) -> None:
    live, dead = make_job(state, settings), make_job(state, settings)
    state.claim(live.id, "w1", lease_s=60)
    state.claim(dead.id, "w2", lease_s=0.01)
    time.sleep(0.05)
    expired = state.expired_leases(time.time())
    assert [j.id for j in expired] == [dead.id]
    assert state.release(live.id, None, LOST) is None
    released = state.release(dead.id, None, LOST)
    assert released is not None and released.status == JobStatus.INTERRUPTED and released.error == LOST
    assert state.expired_leases(time.time()) == []
    assert not state.heartbeat(dead.id, "w2", 30).owned  # the old worker learns it lost the job
    again = state.claim(dead.id, "w3", 30)
    assert again is not None and again.attempts == 2 and again.error is None


def test_expired_jobs_are_only_finished_ones(state: StateStore, settings: Settings) -> None:
    past = time.time() - 10
    finished = make_job(state, settings, expires_at=past)
    state.request_cancel("acme", finished.id)
    waiting = make_job(state, settings, expires_at=past)
    assert [j.id for j in state.expired_jobs(time.time())] == [finished.id]
    state.delete_job(finished.id)
    with pytest.raises(NotFoundError):
        state.get_job(None, finished.id)
    assert state.list_jobs("acme") == [state.get_job("acme", waiting.id)]
    assert state.count_by_status()[JobStatus.CANCELLED] == 0


def test_ping(state: StateStore) -> None:
    state.ping()


def test_quota_counts_are_per_tenant(state: StateStore, settings: Settings) -> None:
    assert (
        state.count_running_jobs("acme"),
        state.count_waiting_jobs("acme"),
        state.stored_bytes("acme"),
    ) == (
        0,
        0,
        0,
    )
    jobs = [make_job(state, settings, tenant="acme") for _ in range(3)]
    make_job(state, settings, tenant="other")
    assert state.count_waiting_jobs("acme") == 3
    assert state.claim(jobs[0].id, "w1", 30.0) is not None
    assert (state.count_running_jobs("acme"), state.count_waiting_jobs("acme")) == (1, 2)
    state.request_cancel("acme", jobs[1].id)
    assert state.count_waiting_jobs("acme") == 1
    # an interrupted job waits for another try: it counts as waiting again
    state.release(jobs[0].id, "w1", LOST)
    assert (state.count_running_jobs("acme"), state.count_waiting_jobs("acme")) == (0, 2)
    assert (state.count_running_jobs("other"), state.count_waiting_jobs("other")) == (0, 1)


def test_stored_bytes_follow_uploads(state: StateStore) -> None:
    first, second, theirs = upload("acme"), upload("acme"), upload("other")
    for u in (first, second, theirs):
        state.add_upload(u)
    assert state.stored_bytes("acme") == first.size + second.size
    state.delete_upload("acme", first.id)
    assert state.stored_bytes("acme") == second.size
    assert state.stored_bytes("other") == theirs.size


def test_key_quota_overrides_are_stored(state: StateStore) -> None:
    _, record = create_key(state, "acme", "ci", quotas={"max_running_jobs": 1, "rate_write_per_s": 0.5})
    found = state.find_key(record.digest)
    assert found is not None and found.quotas == {"max_running_jobs": 1, "rate_write_per_s": 0.5}
    assert state.list_keys()[0].quotas == found.quotas
    assert state.revoke_key(record.id).quotas == found.quotas

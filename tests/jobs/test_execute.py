"""execute_job: one run of one job, with stand-in runners (the real one is tested end to end)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis
from jobtools import TINY_SPEC, FakeRunner, make_job, upload, wait_for

from service.errors import ShapeMismatchError
from service.jobs import execute
from service.jobs.execute import Outcome, Stopper, StopReason, execute_job, upload_resolver
from service.jobs.records import MAX_ATTEMPTS, JobStatus
from service.jobs.state import StateStore
from service.settings import Settings
from service.storage import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


def test_success_records_manifest_artifacts_and_best_loss(
    state: StateStore, store: LocalStore, settings: Settings
) -> None:
    job = make_job(state, settings)
    outcome = execute_job(job.id, state=state, store=store, worker_id="w", runner=FakeRunner(iterations=3))
    assert outcome == Outcome.FINISHED
    done = state.get_job("acme", job.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1
    assert done.manifest is not None and done.manifest["metrics"] == {"psnr": 12.5}
    key = done.artifacts["metrics.json"]
    assert key == f"acme/jobs/{job.id}/metrics.json"
    assert json.loads(store.get_bytes(key))["job_id"] == job.id
    assert done.progress is not None and done.progress.iteration == 3
    assert done.progress.best_loss == pytest.approx(10.0 / 3)


def test_a_job_that_is_not_waiting_is_skipped(
    state: StateStore, store: LocalStore, settings: Settings
) -> None:
    job = make_job(state, settings)
    state.request_cancel("acme", job.id)
    runner = FakeRunner()
    assert execute_job(job.id, state=state, store=store, worker_id="w", runner=runner) == Outcome.SKIPPED
    assert runner.calls == 0


def test_domain_errors_fail_the_job_with_their_message(
    state: StateStore, store: LocalStore, settings: Settings
) -> None:
    job = make_job(state, settings)
    error = ShapeMismatchError("the gradient tensors do not match the model", ["missing: fc.weight"])
    execute_job(job.id, state=state, store=store, worker_id="w", runner=FakeRunner(error=error))
    failed = state.get_job("acme", job.id)
    assert failed.status == JobStatus.FAILED
    assert failed.error is not None and failed.error.code == "shape_mismatch"
    assert failed.error.message == "the gradient tensors do not match the model"


def test_unexpected_errors_fail_without_leaking_details(
    state: StateStore, store: LocalStore, settings: Settings
) -> None:
    job = make_job(state, settings)
    execute_job(
        job.id, state=state, store=store, worker_id="w", runner=FakeRunner(error=KeyError("secret-ish"))
    )
    failed = state.get_job("acme", job.id)
    assert failed.error is not None and failed.error.code == "internal"
    assert "secret-ish" not in failed.error.message and job.id in failed.error.message


def test_transient_errors_retry_until_tries_run_out(
    state: StateStore, store: LocalStore, settings: Settings
) -> None:
    job = make_job(state, settings)
    runner = FakeRunner(error=redis.exceptions.ConnectionError("connection reset"))
    outcomes = [
        execute_job(job.id, state=state, store=store, worker_id=f"w{i}", runner=runner) for i in range(4)
    ]
    assert outcomes == [Outcome.RELEASED] * (MAX_ATTEMPTS - 1) + [Outcome.FINISHED, Outcome.SKIPPED]
    failed = state.get_job("acme", job.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == MAX_ATTEMPTS
    assert failed.error is not None and failed.error.code == "transient"


def test_a_cancel_reaches_the_running_job(
    state: StateStore, store: LocalStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execute, "HEARTBEAT_S", 0.02)
    job = make_job(state, settings)
    runner = FakeRunner(iterations=500, delay_s=0.01)
    result: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: result.append(
            execute_job(job.id, state=state, store=store, worker_id="w", runner=runner)
        )
    )
    thread.start()
    runner.started.wait(5)
    state.request_cancel("acme", job.id)
    thread.join(10)
    assert result == [Outcome.FINISHED]
    cancelled = state.get_job("acme", job.id)
    assert cancelled.status == JobStatus.CANCELLED
    assert cancelled.progress is not None and cancelled.progress.iteration < 500


def test_a_shutdown_puts_the_job_back(state: StateStore, store: LocalStore, settings: Settings) -> None:
    job = make_job(state, settings)
    stopper = Stopper()
    stopper.stop(StopReason.SHUTDOWN)
    outcome = execute_job(
        job.id, state=state, store=store, worker_id="w", runner=FakeRunner(), stopper=stopper
    )
    assert outcome == Outcome.RELEASED
    back = state.get_job("acme", job.id)
    assert back.status == JobStatus.INTERRUPTED and back.error is not None


def test_a_lost_lease_stops_the_run_and_records_nothing(
    state: StateStore, store: LocalStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execute, "HEARTBEAT_S", 0.02)
    job = make_job(state, settings)
    runner = FakeRunner(iterations=500, delay_s=0.01)
    result: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: result.append(
            execute_job(job.id, state=state, store=store, worker_id="w1", runner=runner)
        )
    )
    thread.start()
    runner.started.wait(5)
    # The reaper gave the job away (as it does when it thinks w1 died) and another worker took it.
    wait_for(lambda: state.get_job(None, job.id).progress is not None, what="progress")
    monkeypatch.setattr(execute, "LEASE_S", 0.0)
    wait_for(
        lambda: state.release(job.id, None, execute.JobError(code="worker_lost", message="x")) is not None
    )
    assert state.claim(job.id, "w2", 60) is not None
    thread.join(10)
    assert result == [Outcome.LOST]
    assert state.get_job(None, job.id).worker_id == "w2"


def test_the_deadline_stops_a_run_that_overstays(
    state: StateStore, store: LocalStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execute, "SETUP_GRACE_S", 0.0)
    job = make_job(state, settings, spec={**TINY_SPEC, "budget": {"iterations": 4, "time_limit_s": 0.001}})
    execute_job(
        job.id, state=state, store=store, worker_id="w", runner=FakeRunner(iterations=50, delay_s=0.01)
    )
    failed = state.get_job("acme", job.id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error.code == "time_limit" and "budget.time_limit_s" in failed.error.message


def test_resolver_reads_only_the_tenants_uploads(state: StateStore, store: LocalStore) -> None:
    mine = upload("acme")
    state.add_upload(mine)
    store.put_bytes(mine.key, b"weights")
    assert upload_resolver(state, store, "acme")(mine.id) == b"weights"
    with pytest.raises(execute.NotFoundError, match="no longer exists"):
        upload_resolver(state, store, "other")(mine.id)
    with pytest.raises(execute.NotFoundError):
        upload_resolver(state, store, "acme")("/etc/passwd")


def test_a_tenant_at_its_running_quota_keeps_its_next_job_waiting(
    state: StateStore, store: LocalStore, settings: Settings
) -> None:
    running = make_job(state, settings, max_running_jobs=1)
    assert state.claim(running.id, "other-worker", 30.0) is not None
    waiting = make_job(state, settings, max_running_jobs=1)
    theirs = make_job(state, settings, tenant="other", max_running_jobs=1)
    outcome = execute_job(waiting.id, state=state, store=store, worker_id="w", runner=FakeRunner())
    assert outcome == Outcome.DEFERRED
    assert state.get_job("acme", waiting.id).status == JobStatus.QUEUED
    assert state.get_job("acme", waiting.id).attempts == 0
    # another tenant's job runs
    assert execute_job(theirs.id, state=state, store=store, worker_id="w", runner=FakeRunner()) == (
        Outcome.FINISHED
    )
    # once the running job ends, the waiting one runs
    state.finish(running.id, "other-worker", JobStatus.SUCCEEDED)
    assert execute_job(waiting.id, state=state, store=store, worker_id="w", runner=FakeRunner()) == (
        Outcome.FINISHED
    )

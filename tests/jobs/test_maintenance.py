"""The reaper (dead workers), the retention sweep (private data expires) and the orphan sweep (stored
objects no record claims; on a local folder and on moto's S3 server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobtools import make_job, upload
from moto.server import ThreadedMotoServer

from service.errors import NotFoundError
from service.jobs import maintenance
from service.jobs.maintenance import Housekeeper, reap, sweep, sweep_orphans
from service.jobs.queue import QueueEntry
from service.jobs.records import MAX_ATTEMPTS, JobRecord, JobStatus
from service.jobs.state import StateStore
from service.settings import Settings
from service.storage import ArtifactStore, LocalStore
from service.storage_s3 import S3Store


class RecordingQueue:
    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.ensured: list[str] = []
        self.discarded: list[str] = []

    async def start(self) -> None: ...

    async def enqueue(self, job: JobRecord) -> None:
        self.enqueued.append(job.id)

    async def cancel(self, job: JobRecord) -> None: ...

    async def ensure_queued(self, job: JobRecord) -> None:
        self.ensured.append(job.id)

    async def entries(self, before: float, limit: int) -> list[QueueEntry]:
        return []

    async def discard(self, ref: str) -> None:
        self.discarded.append(ref)

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def test_reaper_requeues_jobs_of_dead_workers(state: StateStore, settings: Settings) -> None:
    dead, alive = make_job(state, settings), make_job(state, settings)
    state.claim(dead.id, "w-dead", lease_s=0.01)
    state.claim(alive.id, "w-alive", lease_s=60)
    time.sleep(0.05)
    queue = RecordingQueue()
    assert asyncio.run(reap(state, queue)) == 1
    assert queue.enqueued == [dead.id]
    job = state.get_job(None, dead.id)
    assert job.status == JobStatus.INTERRUPTED
    assert job.error is not None and job.error.code == "worker_lost"
    assert state.get_job(None, alive.id).status == JobStatus.RUNNING
    assert asyncio.run(reap(state, queue)) == 0  # handled once


def test_reaper_fails_a_job_whose_tries_are_used_up(state: StateStore, settings: Settings) -> None:
    job = make_job(state, settings, attempts=MAX_ATTEMPTS - 1)
    state.claim(job.id, "w", lease_s=0.01)
    time.sleep(0.05)
    queue = RecordingQueue()
    asyncio.run(reap(state, queue))
    failed = state.get_job(None, job.id)
    assert failed.status == JobStatus.FAILED and queue.enqueued == []
    assert failed.error is not None and "stopped responding" in failed.error.message


def test_reaper_checks_long_waiting_jobs_against_the_queue(
    state: StateStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = make_job(state, settings)
    queue = RecordingQueue()
    asyncio.run(reap(state, queue))
    assert queue.ensured == []
    monkeypatch.setattr(maintenance, "STALE_WAIT_S", -1.0)
    asyncio.run(reap(state, queue))
    assert queue.ensured == [waiting.id]


def test_sweep_deletes_expired_jobs_and_uploads_with_their_bytes(
    state: StateStore, settings: Settings, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "artifacts")
    past = time.time() - 1
    expired = make_job(state, settings, expires_at=past)
    state.request_cancel("acme", expired.id)
    running = make_job(state, settings, expires_at=past)
    state.claim(running.id, "w", 60)
    kept = make_job(state, settings)
    for job in (expired, running, kept):
        store.put_bytes(f"acme/jobs/{job.id}/grid.png", b"png")
    old, new = upload(expires_in=-1), upload()
    for u in (old, new):
        state.add_upload(u)
        store.put_bytes(u.key, b"weights")

    assert sweep(state, store) == (1, 1)
    with pytest.raises(NotFoundError):
        state.get_job(None, expired.id)
    with pytest.raises(NotFoundError):
        state.get_upload("acme", old.id)
    assert store.list(f"acme/jobs/{expired.id}") == [] and not store.exists(old.key)
    assert store.exists(f"acme/jobs/{running.id}/grid.png")  # still running: kept until it ends
    assert store.exists(f"acme/jobs/{kept.id}/grid.png") and store.exists(new.key)


def test_housekeeper_reaps_in_the_background(state: StateStore, settings: Settings, tmp_path: Path) -> None:
    job = make_job(state, settings)
    state.claim(job.id, "w", lease_s=0.01)
    queue = RecordingQueue()

    async def scenario() -> None:
        keeper = Housekeeper(state, LocalStore(tmp_path / "a"), queue, reap_interval_s=0.02)
        keeper.start()
        for _ in range(200):
            if queue.enqueued:
                break
            await asyncio.sleep(0.02)
        await keeper.stop()

    asyncio.run(scenario())
    assert queue.enqueued == [job.id]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def artifact_store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    bucket = f"gradleak-test-{uuid.uuid4().hex[:12]}"
    return S3Store(
        request.getfixturevalue("s3_endpoint"), "test-access", "test-secret", bucket, region="us-east-1"
    )


def test_orphan_sweep_deletes_what_no_record_claims_once_past_retention(
    state: StateStore, settings: Settings, artifact_store: ArtifactStore
) -> None:
    # As after Redis lost its data: objects of uploads and jobs whose records are gone.
    kept_upload, kept_job = upload(), make_job(state, settings)
    state.add_upload(kept_upload)
    lost_upload, lost_job = upload(), make_job(state, settings)
    state.delete_job(lost_job.id)
    for key in (kept_upload.key, lost_upload.key, "acme/uploads/not-a-folder"):
        artifact_store.put_bytes(key, b"weights")
    for job in (kept_job, lost_job):
        artifact_store.put_bytes(f"acme/jobs/{job.id}/grid.png", b"png")
        artifact_store.put_bytes(f"acme/jobs/{job.id}/report.html", b"<html>")
    everything = artifact_store.list("")
    retention = settings.retention_hours * 3600.0

    assert sweep_orphans(state, artifact_store, retention) == 0  # younger than the retention period
    assert artifact_store.list("") == everything
    assert sweep_orphans(state, artifact_store, retention, now=time.time() + retention + 60) == 2
    assert sorted(artifact_store.list("")) == sorted(
        [
            kept_upload.key,
            "acme/uploads/not-a-folder",  # not an upload's folder: not the sweep's to judge
            f"acme/jobs/{kept_job.id}/grid.png",
            f"acme/jobs/{kept_job.id}/report.html",
        ]
    )

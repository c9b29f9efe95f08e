"""A study survives a real SIGKILL of the process that runs it: restarted, it completes with
every point run exactly once (a finished point is never redone; the point cut off runs again)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from studytools import tiny_study

from service.jobs.embedded import EmbeddedQueue
from service.jobs.records import JobRecord, JobStatus
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings
from service.storage import LocalStore
from service.studies.spec import StudySpec
from service.studies.submit import create_study, plan_of

pytestmark = pytest.mark.slow  # two processes import torch and run real attacks: ~30 s on 2 cores

# Each point's attack runs for its time limit (about a second), long enough to be killed midway.
POINT = {"budget": {"iterations": 100000, "time_limit_s": 1.5}}


def _study(points: int = 4) -> dict:
    study = tiny_study(
        axes=[{"path": "data.labels", "name": "label", "values": [[i] for i in range(points)]}]
    )
    study["job"] = {**study["job"], **POINT}
    study["job"]["update"] = {"simulate": {"images": ["astronaut"]}}
    study["seeds"] = [0]
    return study


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _mid_point(points: list[JobRecord]) -> bool:
    """At least one point finished and another in its attack."""
    done = sum(p.status == JobStatus.SUCCEEDED for p in points)
    attacking = any(
        p.status == JobStatus.RUNNING and p.progress is not None and p.progress.stage == "attack"
        for p in points
    )
    return done >= 1 and attacking


def _check_exactly_once(before: list[JobRecord], after: list[JobRecord]) -> None:
    finished = {p.id: p for p in before if p.status == JobStatus.SUCCEEDED}
    cut_off = [p.id for p in before if p.status == JobStatus.RUNNING]
    assert finished and len(cut_off) == 1
    assert all(p.status == JobStatus.SUCCEEDED for p in after), [(p.id, p.status, p.error) for p in after]
    for p in after:
        if p.id in finished:  # not redone: the same run, one attempt
            assert p.attempts == 1 and p.finished_at == finished[p.id].finished_at
            assert p.manifest == finished[p.id].manifest
        elif p.id in cut_off:  # killed midway, run again from the start
            assert p.attempts == 2
        else:
            assert p.attempts == 1
    assert sum(p.attempts for p in after) == len(after) + 1


def test_a_killed_study_process_resumes_and_runs_every_point_once(tmp_path: Path) -> None:
    """`gradleak study run` (which runs the study's worker loop in its own process) is SIGKILLed
    in the middle of a point; `--resume` finishes the study."""
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(_study()))
    out = tmp_path / "runs"
    cli = [sys.executable, "-m", "service.cli", "study", "run"]
    proc = subprocess.Popen(
        [*cli, str(spec), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait(lambda: (out / "studies.db").exists(), 60, "the study's store")
        state = SQLiteStateStore(out / "studies.db")
        _wait(lambda: bool(state.list_jobs("local", kind="std")), 60, "the study's record")
        study = state.list_jobs("local", kind="std")[0]
        ids = [p.id for p in plan_of(study).points]

        def points() -> list[JobRecord]:
            return [state.get_job(None, i) for i in ids]

        _wait(lambda: _mid_point(points()), 300, "a point in its attack after a finished one")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        before = points()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert state.get_job(None, study.id).status == JobStatus.RUNNING  # left behind by the dead process

    resumed = subprocess.run(
        [*cli, "--resume", study.id, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"study {study.id} (tiny): succeeded; 4/4 points (4 succeeded)" in resumed.stdout
    _check_exactly_once(before, points())
    done = state.get_job(None, study.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2
    assert (done.manifest or {})["statuses"] == {"succeeded": 4}
    assert {"table.csv", "report.html"} <= set(done.artifacts)
    state.close()


def test_a_killed_embedded_worker_process_is_replaced_and_the_study_completes(tmp_path: Path) -> None:
    """The embedded queue's worker process (the real runner) is SIGKILLed in the middle of a
    study's point; the queue starts another and the study completes."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=None, s3_endpoint=None)
    state = SQLiteStateStore(tmp_path / "data" / "gradleak.db")
    store = LocalStore(tmp_path / "data" / "artifacts")
    study, records, _ = create_study(StudySpec.model_validate(_study()), "acme", settings, state)

    def points() -> list[JobRecord]:
        return [state.get_job(None, r.id) for r in records]

    async def scenario() -> list[JobRecord]:
        queue = EmbeddedQueue(settings, state, store)
        await queue.start()
        await queue.enqueue(study)
        await asyncio.to_thread(_wait, lambda: _mid_point(points()), 300, "a point in its attack")
        workers = [p for p in multiprocessing.active_children() if p.name == "gradleak-worker"]
        assert len(workers) == 1 and workers[0].pid is not None
        os.kill(workers[0].pid, signal.SIGKILL)
        before = points()
        done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
        await asyncio.to_thread(_wait, lambda: state.get_job(None, study.id).status in done, 180, "the study")
        await queue.close()
        return before

    before = asyncio.run(scenario())
    _check_exactly_once(before, points())
    finished = state.get_job(None, study.id)
    assert finished.status == JobStatus.SUCCEEDED, finished.error
    assert (finished.manifest or {})["statuses"] == {"succeeded": 4}
    state.close()

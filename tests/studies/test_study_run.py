"""A study's run through `execute_job`: points run once, resume after a crash, cancel, outputs."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from collections import Counter

import pytest
from studytools import Crash, PointRunner, tiny_study

from service.jobs import execute
from service.jobs.execute import Outcome, execute_job
from service.jobs.maintenance import reap
from service.jobs.records import JobRecord, JobStatus
from service.jobs.state import StateStore
from service.settings import Settings
from service.storage import LocalStore
from service.studies.outputs import JOB_COLUMNS, columns
from service.studies.spec import StudySpec
from service.studies.submit import create_study, plan_of


class ListQueue:
    def __init__(self) -> None:
        self.queued: list[str] = []

    async def enqueue(self, job: JobRecord) -> None:
        self.queued.append(job.id)

    async def ensure_queued(self, job: JobRecord) -> None:
        self.queued.append(job.id)

    async def entries(self, before: float, limit: int) -> list[object]:
        return []  # no queue of its own to clean: entries live in `queued`

    async def discard(self, ref: str) -> None:
        raise AssertionError(f"nothing should be discarded here ({ref})")


def submit(state: StateStore, settings: Settings, **changes: object) -> tuple[JobRecord, list[JobRecord]]:
    study, points, created = create_study(
        StudySpec.model_validate(tiny_study(**changes)), "acme", settings, state
    )
    assert created
    return study, points


def run(
    state: StateStore, store: LocalStore, job_id: str, runner: PointRunner, worker: str = "w1"
) -> Outcome:
    return execute_job(job_id, state=state, store=store, worker_id=worker, runner=runner)


def test_a_study_runs_every_point_once_and_writes_its_table_plots_and_report(
    sqlite_state, settings, tmp_path
) -> None:
    store = LocalStore(tmp_path / "artifacts")
    study, points = submit(sqlite_state, settings)
    runner = PointRunner()
    assert run(sqlite_state, store, study.id, runner) == Outcome.FINISHED
    done = sqlite_state.get_job("acme", study.id)
    assert done.status == JobStatus.SUCCEEDED
    assert runner.finished == Counter({p.id: 1 for p in points})
    assert all(sqlite_state.get_job("acme", p.id).status == JobStatus.SUCCEEDED for p in points)
    assert done.progress is not None and (done.progress.iteration, done.progress.total) == (8, 8)

    names = set(done.artifacts)
    for name in (
        "table.csv",
        "table.json",
        "report.html",
        "metrics.json",
        "plots/budget.iterations.png",
        "plots/budget.iterations.svg",
        "plots/defense.png",
        "plots/defense.svg",
    ):
        assert name in names, name
        assert store.size(done.artifacts[name]) > 0
    assert store.get_bytes(done.artifacts["plots/defense.png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in store.get_bytes(done.artifacts["plots/budget.iterations.svg"])[:400]

    rows = list(csv.DictReader(io.StringIO(store.get_bytes(done.artifacts["table.csv"]).decode())))
    assert list(rows[0]) == columns(plan_of(done))
    assert list(rows[0])[:5] == ["point", "budget.iterations", "defense", "seed", "status"]
    assert set(JOB_COLUMNS) <= set(rows[0])
    by_point = {int(r["point"]): r for r in rows}
    assert len(by_point) == 8
    for p in plan_of(done).points:
        r = by_point[p.index]
        expected = 10 + p.values["budget.iterations"] + p.seed + (3 if p.values["defense"] == "none" else 0)
        assert float(r["psnr_mean"]) == expected and float(r["psnr_worst"]) == expected + 2
        assert r["id"] == p.id and r["label_accuracy"] == "1.0" and r["total_s"] == "0.4"
    table = json.loads(store.get_bytes(done.artifacts["table.json"]))
    assert table["columns"] == list(rows[0]) and len(table["rows"]) == 8
    report = store.get_bytes(done.artifacts["report.html"]).decode()
    assert "data:image/png;base64," in report and "budget.iterations" in report and "<table>" in report


def test_after_a_crash_the_study_resumes_without_rerunning_finished_points(
    sqlite_state, settings, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(execute, "LEASE_S", 0.3)  # the dead worker's leases lapse quickly
    store = LocalStore(tmp_path / "artifacts")
    study, points = submit(sqlite_state, settings)
    crashing = PointRunner(crash_on=4)
    with pytest.raises(Crash):
        run(sqlite_state, store, study.id, crashing)
    assert sum(crashing.finished.values()) == 3
    statuses = Counter(sqlite_state.get_job(None, p.id).status for p in points)
    assert statuses == Counter({JobStatus.SUCCEEDED: 3, JobStatus.RUNNING: 1, JobStatus.QUEUED: 4})

    # the reaper finds the dead worker's leases (study and point) and queues both again
    queue = ListQueue()
    time.sleep(0.5)
    assert asyncio.run(reap(sqlite_state, queue)) == 2  # type: ignore[arg-type]
    assert study.id in queue.queued
    restarted = PointRunner()
    assert run(sqlite_state, store, study.id, restarted, worker="w2") == Outcome.FINISHED
    assert sqlite_state.get_job(None, study.id).status == JobStatus.SUCCEEDED
    assert not set(crashing.finished) & set(restarted.finished)  # nothing finished is redone
    assert crashing.finished + restarted.finished == Counter({p.id: 1 for p in points})


def test_a_cancelled_study_stops_its_running_point_and_cancels_the_rest(
    sqlite_state, settings, tmp_path
) -> None:
    store = LocalStore(tmp_path / "artifacts")
    study, points = submit(sqlite_state, settings)
    runner = PointRunner(block_on=2)
    outcome: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcome.append(run(sqlite_state, store, study.id, runner)))
    thread.start()
    assert runner.blocked.wait(20)
    sqlite_state.request_cancel("acme", study.id)
    thread.join(30)
    assert outcome == [Outcome.FINISHED]
    done = sqlite_state.get_job("acme", study.id)
    assert done.status == JobStatus.CANCELLED
    statuses = [sqlite_state.get_job(None, p.id).status for p in points]
    assert statuses[0] == JobStatus.SUCCEEDED
    assert statuses[1:] == [JobStatus.CANCELLED] * 7
    assert runner.calls == 2
    assert "table.csv" in done.artifacts  # what finished is still tabulated

"""Cancelling is honoured outside the attack loop too: during the setup (client simulation, label
inference) and before scoring, with the real runner, so a cancelled job frees its worker within
seconds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from jobtools import make_job

from service.jobs import execute
from service.jobs.execute import Outcome, execute_job
from service.jobs.records import JobStatus
from service.jobs.runner import run_job
from service.jobs.state import StateStore
from service.jobs.types import JobContext, Progress
from service.settings import Settings
from service.specs import JobSpec
from service.storage import LocalStore

# A FedAvg client with hundreds of local steps: a setup of tens of seconds on a CPU.
SLOW_SETUP = {
    "model": {"arch": "resnet18", "knobs": {"stem": "cifar"}},
    "update": {
        "kind": "delta",
        "simulate": {
            "images": ["astronaut", "coffee"],
            "labels": [1, 2],
            "training": {"protocol": "fedavg", "lr": 0.01, "local_epochs": 400, "batch_size": 1},
        },
    },
    "data": {"shape": [3, 32, 32], "labels": [1, 2]},
    "budget": {"iterations": 5, "time_limit_s": 600},
}


def test_a_cancel_during_a_slow_setup_stops_the_run_within_seconds(tmp_path: Path) -> None:
    stop = threading.Event()
    stages: list[str] = []

    def progress(p: Progress) -> None:
        stages.append(p.stage)

    ctx = JobContext(
        job_id="job",
        store=LocalStore(tmp_path),
        prefix="t/jobs/job",
        resolve=bytes,
        progress=progress,
        should_stop=stop.is_set,
    )
    timer = threading.Timer(2.0, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        result = run_job(JobSpec.model_validate(SLOW_SETUP), ctx)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    assert result.status == "cancelled"
    assert result.manifest["stopped_in"] == "setup" and result.artifacts == {}
    assert stages == ["setup"]  # the attack never started
    assert elapsed < 6.0, elapsed  # the full setup takes tens of seconds


def test_a_cancelled_job_frees_its_worker_during_setup(
    state: StateStore, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execute, "HEARTBEAT_S", 0.05)
    job = make_job(state, settings, spec=SLOW_SETUP)
    outcome: list[Outcome] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            execute_job(job.id, state=state, store=LocalStore(tmp_path), worker_id="w", runner=run_job)
        )
    )
    worker.start()
    deadline = time.monotonic() + 30
    while state.get_job("acme", job.id).status != JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well into the client's local training
    state.request_cancel("acme", job.id)
    cancelled_at = time.monotonic()
    worker.join(30)
    assert outcome == [Outcome.FINISHED]
    assert time.monotonic() - cancelled_at < 4.0
    done = state.get_job("acme", job.id)
    assert done.status == JobStatus.CANCELLED
    assert done.progress is not None and done.progress.stage == "setup"

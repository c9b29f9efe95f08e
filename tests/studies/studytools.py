"""Helpers for the study tests: a tiny study over TINY_SPEC and a stand-in point runner."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))

from jobtools import TINY_SPEC

from service.jobs.types import JobContext, JobResult
from service.specs import JobSpec


def tiny_study(**changes: object) -> dict:
    study: dict = {
        "title": "tiny",
        "job": TINY_SPEC,
        "axes": [
            {"path": "budget.iterations", "values": [2, 4]},
            {"path": "defenses", "name": "defense", "values": [[], [{"name": "quantize", "bits": 4}]]},
        ],
        "seeds": [0, 1],
    }
    study.update(changes)
    return study


class Crash(BaseException):
    """Stands for the worker process dying: nothing in the worker catches it."""


class PointRunner:
    """Returns a job manifest shaped like the runner's, its PSNR told by the spec; counts calls,
    and crashes (or blocks) on the call numbered `crash_on` (or `block_on`)."""

    def __init__(self, crash_on: int | None = None, block_on: int | None = None) -> None:
        self.crash_on, self.block_on = crash_on, block_on
        self.calls = 0
        self.finished: Counter[str] = Counter()
        self.blocked = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, spec: Any, ctx: JobContext) -> JobResult:
        assert isinstance(spec, JobSpec)
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == self.crash_on:
            raise Crash
        status = "succeeded"
        if call == self.block_on:
            self.blocked.set()
            while not ctx.should_stop():
                threading.Event().wait(0.02)
            status = "cancelled"
        psnr = 10.0 + spec.budget.iterations + spec.seed + (3.0 if not spec.defenses else 0.0)
        manifest = {
            "status": status,
            "metrics": {
                "mean": {"psnr": psnr, "ssim": 0.5, "lpips": 0.3},
                "worst_case": {"psnr": psnr + 2, "ssim": 0.7, "lpips": 0.1},
                "label_accuracy": {"multiset": 1.0, "positional": 1.0},
            },
            "attack": {"iterations": spec.budget.iterations},
            "timings": {"setup_s": 0.1, "attack_s": 0.2, "scoring_s": 0.05, "total_s": 0.4},
        }
        with self.lock:
            self.finished[ctx.job_id] += 1
        return JobResult(status=status, manifest=manifest)  # type: ignore[arg-type]

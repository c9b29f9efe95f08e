"""The job runner's glibc tuning keeps freed blocks: a freed 8 MiB tensor comes back without
page faults. Measured in a fresh interpreter so the rest of the suite's process is not the subject."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, resource, sys
import torch
from service.jobs.allocator import keep_freed_memory

def faults_per_cycle():
    for _ in range(3):
        torch.ones(2 * 2**20)  # warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(2 * 2**20)  # 8 MiB, allocated, written and freed
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

untuned = faults_per_cycle()
applied = keep_freed_memory()
tuned = faults_per_cycle()
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "untuned": untuned, "tuned": tuned}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"] and r["again"]
    assert r["untuned"] > 100  # glibc mmaps 8 MiB afresh and faults it in on every cycle
    assert r["tuned"] < r["untuned"] / 20  # the heap keeps the block: (next to) no faults


def test_the_runner_applies_it_unless_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.jobs import runner
    from service.jobs.types import JobContext
    from service.settings import Settings
    from service.specs import JobSpec
    from service.storage import LocalStore

    spec = JobSpec.model_validate(
        {
            "model": {"arch": "mlp"},
            "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
            "data": {"shape": [3, 16, 16], "num_classes": 4},
            "attack": {"name": "dlg"},
            "budget": {"iterations": 1},
        }
    )
    calls: list[int] = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append(1) or True)
    for enabled, expected in ((True, 1), (False, 0)):
        calls.clear()
        monkeypatch.setattr(runner, "get_settings", lambda enabled=enabled: Settings(malloc_tuning=enabled))
        ctx = JobContext(job_id="t", store=LocalStore(tmp_path), prefix=f"jobs/{enabled}", resolve=bytes)
        assert runner.run_job(spec, ctx).manifest["attack"]["iterations"] == 1
        assert len(calls) == expected

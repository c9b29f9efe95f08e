"""The job runner's glibc tuning keeps freed memory in the process, measured in fresh interpreters
so the rest of the suite's process is not the subject.

The default test reads glibc's own bookkeeping (mallinfo2): where a large block comes from and
whether free keeps it. That does not depend on the kernel. The page faults the tuning saves are
what users gain, and the slow test counts them on an attack-shaped loop in its steady state; the
count depends on the kernel too (transparent huge pages fault 2 MiB at a time) and on the heap's
layout in the first iterations, which is why it is not in the default suite. An earlier version
averaged faults over the first cycles of a single 8 MiB tensor: that measured how soon the
untuned heap settles, not the tuning, and failed a CI run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")

BOOKKEEPING_PROBE = """
import ctypes, json, sys
import torch
from service.jobs.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print(json.dumps({"skip": "glibc older than 2.33 has no mallinfo2"}))
    raise SystemExit
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2()
x = torch.ones(2 * 2**20)  # 8 MiB, this process's first block that large
live = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "mmapped": live.hblkhd - before.hblkhd,
                  "heap_used": live.uordblks - before.uordblks, "heap_free_after": after.fordblks}))
"""

FAULTS_PROBE = """
import json, resource, statistics, sys
import torch
import torch.nn.functional as F
from torchvision.models import resnet18
from service.jobs.allocator import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
torch.manual_seed(0)
model = resnet18(num_classes=10).eval()
params = list(model.parameters())
x, y = torch.randn(2, 3, 32, 32, requires_grad=True), torch.tensor([1, 3])
faults = []
for _ in range(14):  # a gradient-matching step: the gradient with its graph, then its gradient
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    torch.autograd.grad(sum(g.pow(2).sum() for g in grads), x)
    del grads
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({"applied": applied, "steady_faults": statistics.median(faults[4:])}))
"""


def _probe(code: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


MIB = 2**20


@linux_glibc
def test_a_large_block_comes_from_the_heap_and_free_keeps_it() -> None:
    untuned, tuned = _probe(BOOKKEEPING_PROBE, "untuned"), _probe(BOOKKEEPING_PROBE, "tuned")
    assert untuned["mmapped"] >= 8 * MIB  # glibc maps a block this large afresh (and unmaps it on free)
    assert tuned["applied"] and tuned["again"]  # applied once; a second call reports it in effect
    assert tuned["mmapped"] == 0  # tuned, it comes from the heap
    assert tuned["heap_used"] >= 8 * MIB
    assert tuned["heap_free_after"] >= 8 * MIB  # and free keeps it there for the next one


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.slow
@linux_glibc
@pytest.mark.skipif(
    _huge_pages_always(), reason="transparent huge pages fault 2 MiB at a time: few faults to count"
)
def test_an_attack_step_stops_page_faulting_once_the_heap_has_settled() -> None:
    untuned, tuned = _probe(FAULTS_PROBE, "untuned"), _probe(FAULTS_PROBE, "tuned")
    assert tuned["applied"]
    assert untuned["steady_faults"] > 1000  # mmapped gradients and trimmed heap, faulted in every step
    assert tuned["steady_faults"] < untuned["steady_faults"] / 20  # (next to) none


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

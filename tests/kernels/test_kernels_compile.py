"""The kernels compile for an H100 (sm_90) on this CPU-only machine.

The interpreter runs kernel bodies as numpy and accepts programs the compiler rejects, so every
kernel is also compiled to PTX, for each dtype and cost specialisation the launchers use (by
compile_probe.py, in a process without TRITON_INTERPRET). The aligned path of the matching
kernels must come out as 16-byte vector loads and stores: that is what lets them stream at DRAM
bandwidth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

pytestmark = pytest.mark.skipif(
    "nvidia" not in triton.backends.backends, reason="triton's NVIDIA backend is absent"
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ptx_ops() -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    probe = Path(__file__).with_name("compile_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, dict[str, int]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matching_kernels_use_vector_loads_and_stores(ptx_ops: dict[str, dict[str, int]], dtype: str) -> None:
    stats, backward = ptx_ops[f"stats-{dtype}"], ptx_ops[f"backward-{dtype}"]
    assert stats.get("ld.global.v4.b32", 0) > 0, stats
    assert backward.get("ld.global.v4.b32", 0) > 0, backward
    assert backward.get("st.global.v4.b32", 0) > 0, backward


def test_every_specialisation_compiles(ptx_ops: dict[str, dict[str, int]]) -> None:
    finalizers = [f"finalize-fp32-{cost}" for cost in (0, 1, 2)] + ["finalize-fp64-2"]
    for name in [*finalizers, "tv-forward", "tv-backward"]:
        assert any(op.startswith("st.global") for op in ptx_ops[name]), (name, ptx_ops[name])

"""The quickstart of both READMEs runs verbatim against `gradleak serve` (a live server on
loopback): the same code block in each, executed as written in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def quickstart(readme: Path, heading: str) -> str:
    text = readme.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no python block after {heading!r} in {readme}"
    return match.group(1)


def test_the_readme_quickstart_runs_verbatim(live_url: str, tmp_path: Path) -> None:
    code = quickstart(ROOT / "README.md", "## Python SDK")
    assert code == quickstart(ROOT / "clients/python/README.md", "## Quickstart")
    assert "prepare.write_inputs" in code and "Client().audit" in code
    env = {**os.environ, "GRADLEAK_URL": live_url, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("GRADLEAK_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    psnr = float(done.stdout.strip().splitlines()[-1])
    assert 5 < psnr <= 100
    assert sorted(p.name for p in (tmp_path / "audit-inputs").iterdir()) == [
        "ground_truth.safetensors",
        "model.onnx",
        "update.safetensors",
    ]

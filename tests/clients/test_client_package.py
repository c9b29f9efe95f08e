"""The distribution: importing the SDK, its CLI, policy, gate and embedded modules imports neither
torch nor numpy nor the server; it depends on httpx and pydantic only; it is typed."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gradleak_client

HEAVY = ("torch", "numpy", "safetensors", "service", "api", "fastapi", "yaml")


def test_importing_the_sdk_pulls_in_nothing_heavy() -> None:
    modules = "gradleak_client, gradleak_client.cli, gradleak_client.policy, gradleak_client.audit, " + (
        "gradleak_client.types, gradleak_client.embedded"
    )
    code = (
        f"import json, sys; import {modules}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_the_distribution_depends_on_httpx_and_pydantic_only() -> None:
    requires = metadata.requires("gradleak-client") or []
    base = sorted(r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r)
    assert base == ["httpx", "pydantic"]
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts["gradleak-client"] == "gradleak_client.cli:main"


def test_the_package_is_typed_and_exports_its_api() -> None:
    assert (Path(gradleak_client.__file__).parent / "py.typed").is_file()
    for name in gradleak_client.__all__:
        assert hasattr(gradleak_client, name), name
    assert issubclass(gradleak_client.RateLimitError, gradleak_client.APIStatusError)
    assert issubclass(gradleak_client.APITimeoutError, gradleak_client.APIConnectionError)
    assert issubclass(gradleak_client.JobFailedError, gradleak_client.GradleakError)

"""The distribution: importing the SDK, its CLI, policy, gate and embedded modules imports neither
torch nor numpy nor the server; it depends on httpx and pydantic only; it is typed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

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


def fresh_venv(path: Path, env: dict[str, str]) -> list[str | Path]:
    """A new virtual environment without pip; this environment's pip installs into it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True, env=env)
    return [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "-q",
        "--python",
        path / "bin" / "python",
    ]


def run_installed_cli(venv: Path, env: dict[str, str], cwd: Path) -> None:
    result = subprocess.run(
        [venv / "bin" / "gradleak-client", "--help"], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert result.returncode == 0 and "usage: gradleak-client" in result.stdout, result.stderr
    probe = "import importlib.util as u, gradleak_client as g; print(g.__file__, u.find_spec('torch'))"
    out = subprocess.run(
        [venv / "bin" / "python", "-c", probe], capture_output=True, text=True, check=True, env=env, cwd=cwd
    )
    location, torch_spec = out.stdout.split()
    assert Path(location).is_relative_to(venv) and torch_spec == "None"  # the installed copy, alone


@pytest.mark.slow
def test_the_built_wheel_and_the_git_url_install_into_fresh_environments(tmp_path: Path) -> None:
    """Build the client's wheel and install it into a new virtual environment from local files
    only (its dependencies fetched beforehand, pinned by constraints.txt); then install the
    documented `gradleak-client @ git+URL#subdirectory=clients/python` form from this repository's
    committed HEAD (pip needs the registry there, for setuptools). Both run the CLI."""
    root = Path(__file__).resolve().parents[2]
    dist, deps = tmp_path / "dist", tmp_path / "deps"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", dist, root / "clients" / "python"], check=True)
    [wheel] = dist.glob("gradleak_client-*.whl")
    constraints = ["-c", root / "constraints.txt"]
    subprocess.run([*pip, "download", "-d", deps, *constraints, "--only-binary=:all:", wheel], check=True)
    # nothing of this checkout or of the project's environment may leak into the new ones
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    from_wheel = tmp_path / "from-wheel"
    install = fresh_venv(from_wheel, env)
    subprocess.run([*install, "install", "--no-index", "--find-links", deps, wheel], check=True, env=env)
    run_installed_cli(from_wheel, env, tmp_path)

    from_git = tmp_path / "from-git"
    install = fresh_venv(from_git, env)
    requirement = f"gradleak-client @ git+file://{root}#subdirectory=clients/python"
    subprocess.run([*install, "install", "--find-links", deps, requirement], check=True, env=env)
    run_installed_cli(from_git, env, tmp_path)

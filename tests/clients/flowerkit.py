"""Flower's runtime for the tests: flwr pins versions of fastapi, starlette, uvicorn, typer, rich
and packaging that conflict with this project's, so it lives in .flower-env (`make flower-env`,
built here when missing) and runs in subprocesses whose PYTHONPATH puts it first, then this tree
(gradleak_client, and the service package the example app takes its LeNet from), then the
project's environment (torch). A `gradleak serve` subprocess is the service they talk to."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
FLOWER_ENV = ROOT / ".flower-env"
CONSTRAINTS = ROOT / "constraints-flower.txt"
APP = ROOT / "clients" / "python" / "examples" / "flower_app"
FLWR = "flwr[simulation]==1.42.0"


def ensure_flower_env() -> Path:
    """.flower-env as `make flower-env` builds it, (re)installed when its constraints changed."""
    stamp = FLOWER_ENV / ".installed"
    digest = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != digest:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(FLOWER_ENV)]
        subprocess.run(
            [*pip, "-c", str(CONSTRAINTS), FLWR],
            check=True,
            timeout=900,
        )
        stamp.write_text(digest)
    return FLOWER_ENV


def flower_environ(home: Path) -> dict[str, str]:
    """The environment of a Flower process: flwr first, FLWR_HOME in the test's folder."""
    env = ensure_flower_env()
    paths = [str(env), str(ROOT), str(ROOT / "clients" / "python" / "src")]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GRADLEAK_", "FLWR_"))}
    environ.update(
        PYTHONPATH=os.pathsep.join(paths),
        PATH=os.pathsep.join([str(env / "bin"), os.environ.get("PATH", "")]),
        FLWR_HOME=str(home),
        OMP_NUM_THREADS="1",
        RAY_DEDUP_LOGS="0",
    )
    return environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: {log.read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s: {log.read_text()[-3000:]}")


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started processes, each in its own session, ended with their children on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(started):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def spawn(
    started: list[subprocess.Popen[bytes]], args: list[str], log: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    started.append(process)
    return process


def gradleak_serve(started: list[subprocess.Popen[bytes]], folder: Path) -> str:
    """`gradleak serve` on a free loopback port, with its state in `folder`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADLEAK_")}
    env.update(
        GRADLEAK_DATA_DIR=str(folder / "data"),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python" / "src")]),
    )
    args = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = spawn(started, args, folder / "gradleak.log", env, folder)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/healthz", process, folder / "gradleak.log")
    return url

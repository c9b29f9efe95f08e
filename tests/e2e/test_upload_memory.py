"""An upload's memory in the API process stays bounded whatever its size: a real `gradleak serve`
takes a ~150 MB model upload, streamed from disk, with the local store and with S3 (a moto
server); the API's peak RSS during the upload (VmHWM, reset before it) must stay far below the
file's size (measured: +27 MiB local, +30 MiB on S3, for 147 MiB). Before uploads were streamed,
a 141 MB upload took about +650 MB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_service_e2e import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
META = {"arch": "mlp", "image_shape": [3, 224, 224], "num_classes": 10}
SMALL_META = {**META, "image_shape": [3, 16, 16]}
BOUND_BYTES = 64 * 2**20


def write_weights(path: Path, image_shape: list[int]) -> int:
    """The mlp's weights (zeros) as safetensors, written in chunks: the test never holds them whole."""
    import torch

    from service.models import build_model
    from service.specs import DataSpec, ModelSpec

    with torch.device("meta"):
        model = build_model(ModelSpec(arch="mlp"), DataSpec(shape=tuple(image_shape), num_classes=10))
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        size = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = bytes(1 << 20)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:
            f.write(chunk[: min(len(chunk), left)])
            left -= min(len(chunk), left)
    return path.stat().st_size


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(params=["local", "s3"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    procs: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "GRADLEAK_DATA_DIR": str(tmp_path / "data"),
        "GRADLEAK_MAX_UPLOAD_BYTES": str(512 << 20),
        "GRADLEAK_REDIS_URL": "",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("GRADLEAK_S3_ENDPOINT", None)
    log = (tmp_path / "server.log").open("wb")
    if request.param == "s3":
        s3_port = free_port()
        procs.append(
            subprocess.Popen(
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], stdout=log, stderr=log
            )
        )
        env.update(
            GRADLEAK_S3_ENDPOINT=f"http://127.0.0.1:{s3_port}",
            GRADLEAK_S3_ACCESS_KEY="testing",
            GRADLEAK_S3_SECRET_KEY="testing",
            GRADLEAK_S3_REGION="us-east-1",
            GRADLEAK_S3_SECURE="false",
        )
    port = free_port()
    api = subprocess.Popen(
        [str(BIN / "gradleak"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=log,
    )
    procs.append(api)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 90, "the API to be ready")
        yield url, api.pid
    finally:
        for proc in procs[::-1]:
            stop(proc)


def upload(url: str, path: Path, meta: dict) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            f"{url}/v1/models",
            files={"file": ("weights.safetensors", f)},
            data={"metadata": json.dumps(meta)},
            timeout=120.0,
        )


def test_a_large_upload_takes_bounded_api_memory(server: tuple[str, int], tmp_path: Path) -> None:
    url, pid = server
    small, large = tmp_path / "small.safetensors", tmp_path / "large.safetensors"
    write_weights(small, SMALL_META["image_shape"])
    size = write_weights(large, META["image_shape"])
    assert size > 140 * 2**20
    # the first upload imports the engine; only what a large upload adds is measured
    assert upload(url, small, SMALL_META).status_code == 201
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
    before = rss(pid, "VmRSS")
    response = upload(url, large, META)
    assert response.status_code == 201, response.text
    assert response.json()["size"] == size
    grown = rss(pid, "VmHWM") - before
    assert grown < BOUND_BYTES, f"the API grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB upload"

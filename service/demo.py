"""`make demo`: audit a client's FedSGD update through the embedded service, end to end.

Starts `gradleak serve` with nothing configured on a free loopback port, plays an FL client that
computes its gradient on a shipped photo, uploads the server's model, the update and (for
scoring) the client's image through the HTTP API with the Python SDK, waits for the attack with a
progress bar, prints the metrics and where the reconstruction grid is, and stops the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from gradleak_client import Client
from service.data import load_images, normalize
from service.fl import fedsgd_gradient
from service.models import build_model
from service.specs import DataSpec, JsonScalar, ModelSpec
from service.tensorio import save_safetensors_file

OUT = Path("runs/demo")
ARCH, SIZE = "convnet", 32
KNOBS: dict[str, JsonScalar | list[int]] = {"width": 32}
PHOTO, LABEL = "astronaut", 1
TIME_LIMIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"gradleak serve exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"gradleak serve did not answer on {url} within {timeout:.0f} s")


def play_client() -> tuple[Path, Path, Path]:
    """The FL round as the server sees it: its model, and the gradient the client shared."""
    OUT.mkdir(parents=True, exist_ok=True)
    data = DataSpec(shape=(3, SIZE, SIZE), num_classes=10, normalization="cifar10")
    model = build_model(ModelSpec(arch=ARCH, knobs=KNOBS), data)
    images, _ = load_images("photos", [PHOTO], size=SIZE, channels=3)
    labels = torch.tensor([LABEL])
    gradient = fedsgd_gradient(model, normalize(images, data.resolved_normalization()), labels)
    paths = OUT / "model.safetensors", OUT / "update.safetensors", OUT / "client_images.safetensors"
    save_safetensors_file(model.state_dict(), paths[0])
    save_safetensors_file(gradient, paths[1])
    save_safetensors_file({"images": images, "labels": labels}, paths[2])
    return paths


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the server's request log would bury the demo's own output
    env = {**os.environ, "GRADLEAK_DATA_DIR": str(OUT / "service"), "GRADLEAK_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env)
    try:
        wait_ready(url, server)
        model_file, update_file, truth_file = play_client()
        with Client(base_url=url) as client:
            model = client.models.upload(model_file, arch=ARCH, knobs=KNOBS, image_shape=(3, SIZE, SIZE))
            update = client.updates.upload(
                update_file, model_id=model.id, kind="gradient", client={"protocol": "fedsgd"}, num_images=1
            )
            truth = client.ground_truth.upload(truth_file)
            job = client.jobs.create(
                update_id=update.id,
                ground_truth_id=truth.id,
                attack={"name": "inverting_gradients"},
                knowledge=1,
                budget={"iterations": 20_000, "time_limit_s": TIME_LIMIT_S},
            )
            print(f"job {job.id} queued; attacking for up to {TIME_LIMIT_S:.0f} s", flush=True)
            job = client.jobs.wait(job.id, progress=True, timeout=TIME_LIMIT_S + 300).raise_for_status()
            grid = client.artifacts.download(job.id, "grid.png", OUT / "grid.png")
            report = client.artifacts.download(job.id, "report.html", OUT / "report.html")
        scores = job.scores
        assert scores is not None
        mean, worst = scores.mean, scores.worst_case
        print(f"PSNR {mean['psnr']:.2f} dB (worst case {worst['psnr']:.2f}), SSIM {mean['ssim']:.3f}")
        if scores.label_accuracy is not None:
            print(f"label accuracy {scores.label_accuracy.multiset:.2f}")
        for metric, reason in scores.unavailable.items():
            print(f"{metric} unavailable: {reason}")
        print(f"reconstruction grid (top: the client's image, bottom: rebuilt from its gradient): {grid}")
        print(f"report: {report}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""Helpers for the client tests: a small leaking update and its defended versions, built with the
SDK's own tensor helpers, policies, a live uvicorn server on a free loopback port, and an
in-process test server with API keys."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

SIZE = 16
SHAPE = (3, SIZE, SIZE)
MODEL_META: dict[str, Any] = {"arch": "lenet", "image_shape": list(SHAPE), "num_classes": 10}
UPDATE_META: dict[str, Any] = {"kind": "gradient", "normalization": "none", "num_images": 1}
# DLG with cheap L-BFGS steps: on an untrained LeNet and one 16x16 photo patch it recovers the
# image (about 30 dB PSNR, SSIM above 0.9) in about a second on one CPU thread.
DLG = {"name": "dlg", "max_eval": 5}
DLG_BUDGET = {"iterations": 40}
LEAK_PSNR_DB = 25.0  # the leaking update must be reconstructed at least this well
MAX_PSNR_DB = 20.0  # the gate's threshold
MAX_SSIM = 0.5
NOISE_STD = 0.1  # "heavily noised": about the size of the largest gradient entries
PATCH = 3  # the photo patch the client trains on (a coffee cup)


@lru_cache(maxsize=1)
def lenet_files() -> dict[str, bytes]:
    """weights, a FedSGD gradient of one photo patch, the same gradient noised and quantised to
    two bits by the client, and the patch as ground truth (safetensors bytes)."""
    import numpy as np
    import torch

    from gradleak_client import tensors
    from service.data.patches import photo_patches
    from service.models import build_model
    from service.specs import DataSpec, ModelSpec

    model = build_model(ModelSpec(arch="lenet"), DataSpec(shape=SHAPE, num_classes=10))
    images, labels = photo_patches(size=SIZE, per_class=1)
    x, y = images[PATCH : PATCH + 1], labels[PATCH : PATCH + 1]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    rng = np.random.default_rng(0)
    noised, quantised = {}, {}
    for n, g in grads.items():
        a = tensors.to_numpy(g)
        noised[n] = a + rng.normal(0.0, NOISE_STD, a.shape).astype(np.float32)
        scale = float(np.abs(a).max()) or 1.0
        quantised[n] = np.round(a / scale).astype(np.float32) * scale  # three levels: -scale, 0, scale
    return {
        "weights": tensors.from_state_dict(model.state_dict()),
        "gradient": tensors.to_safetensors(grads),
        "noised": tensors.to_safetensors(noised),
        "quantised": tensors.to_safetensors(quantised),
        "truth": tensors.ground_truth(x, y),
    }


def write_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in lenet_files().items():
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(data)
    return paths


def policy(**changes: Any) -> dict[str, Any]:
    """The gate's policy for the 16x16 LeNet: DLG, worst-case PSNR and SSIM thresholds."""
    body: dict[str, Any] = {
        "model": MODEL_META,
        "update": UPDATE_META,
        "attacks": [{"attack": DLG, "budget": DLG_BUDGET}],
        "thresholds": [
            {"metric": "psnr", "max": MAX_PSNR_DB},
            {"metric": "ssim", "max": MAX_SSIM, "over": "per_image"},
            {"metric": "lpips", "min": 0.3, "required": False},
        ],
    }
    return {**body, **changes}


def write_policy(path: Path, **changes: Any) -> Path:
    path.write_text(json.dumps(policy(**changes)))
    return path


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------


def thread_queue(settings: Any, state: Any, store: Any) -> Any:
    """The embedded queue running the real runner in a thread (no worker process to spawn)."""
    from service.jobs.embedded import EmbeddedQueue
    from service.jobs.runner import run_job

    return EmbeddedQueue(settings, state, store, isolation="thread", runner=run_job)


def server_settings(data_dir: Path, **changes: Any) -> Any:
    from service.settings import Settings

    base = {
        "data_dir": data_dir,
        "redis_url": None,
        "s3_endpoint": None,
        "host": "127.0.0.1",
        "auth_required": False,
        # the module-scoped servers take many tests' requests; the quota tests use their own
        "rate_read_burst": 100_000,
        "rate_write_burst": 100_000,
        "max_queued_jobs": 1000,
    }
    return Settings(**{**base, **changes})


@contextmanager
def live_server(data_dir: Path) -> Iterator[str]:
    """The API under uvicorn on a free loopback port, in a thread; stopped on exit."""
    import uvicorn

    from api.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(server_settings(data_dir, port=port), queue_factory=thread_queue)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live gradleak server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60.0)
        sock.close()

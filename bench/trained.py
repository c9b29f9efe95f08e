"""The default attack on trained models: checkpoints of the photo-patch task at a few accuracies.

Audits meet trained models, while the other attack benchmarks attack untrained ones. This one
trains the registry's `convnet` (defaults: width 64, three conv-ReLU-maxpool blocks, no batch
norm), or with `--arch resnet18` the CIFAR-stem ResNet-18 (its BN in train mode while training),
on the photo-patch task (service.data.patches: 10 classes, 32x32 crops, seed 0, 20 % held
out for testing) with plain minibatch SGD, deterministically (seeded initialisation and batch
order, one thread), and keeps checkpoints after a few step counts as safetensors files in a
cache directory outside the repository ($TMPDIR/gradleak-bench/trained; the same arguments give
the same weights, so nothing large is committed). Each checkpoint's test accuracy is measured,
then the default attack (Inverting Gradients, 1000 iterations unless told otherwise) rebuilds
single test images from a FedSGD gradient, labels known, the weights given as the server's
(`model.weights`), each image and seed its own run.

  python -m bench.trained --steps 0,30,300 --images 4 --seeds 0 \\
      --out bench/results/attacks-cpu-trained.json

`--bn train` makes the attacked client normalise with its own batch statistics (BN in train mode,
a batch of one), `--bn eval` with the checkpoint's running statistics; it matters for resnet18 only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.attacks import RESULTS, quality_fields, report_header

ARCHES: dict[str, dict[str, Any]] = {
    "convnet": {"arch": "convnet", "knobs": {}},
    "resnet18": {"arch": "resnet18", "knobs": {"stem": "cifar"}},
}
LR = 0.01
MOMENTUM = 0.9
BATCH = 32
PER_CLASS = 120


def cache_dir() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "gradleak-bench" / "trained"


def task() -> tuple[Any, Any, Any, Any]:
    from service.data.patches import photo_patches, train_test_split

    images, labels = photo_patches(size=32, per_class=PER_CLASS, seed=0)
    return train_test_split(images, labels, test_fraction=0.2, seed=0)


def model_and_data_spec(arch: str, weights: str | None) -> tuple[Any, Any]:
    from service.specs import DataSpec, ModelSpec

    return ModelSpec(**ARCHES[arch], weights=weights, init_seed=0), DataSpec(
        shape=(3, 32, 32), num_classes=10, normalization="cifar10"
    )


def train(steps: list[int], arch: str = "convnet") -> list[dict[str, Any]]:
    """Checkpoints after each step count in `steps` (0: the initialisation), with test accuracy."""
    import torch
    import torch.nn.functional as F

    from service.data import normalize
    from service.federations.loop import _evaluate
    from service.models import build_model
    from service.tensorio import save_safetensors

    train_x, train_y, test_x, test_y = task()
    mspec, dspec = model_and_data_spec(arch, None)
    norm = dspec.resolved_normalization()
    train_x, test_x = normalize(train_x, norm), normalize(test_x, norm)
    model = build_model(mspec, dspec)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_y), generator=gen)
    cursor = 0
    out = []
    done = 0
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for target in sorted(steps):
        while done < target:
            if cursor + BATCH > len(order):
                order, cursor = torch.randperm(len(train_y), generator=gen), 0
            idx = order[cursor : cursor + BATCH]
            cursor += BATCH
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
            done += 1
        accuracy, loss = _evaluate(model, test_x, test_y)
        path = folder / f"{arch}-patches-step{target}.safetensors"
        path.write_bytes(save_safetensors({k: v.detach() for k, v in model.state_dict().items()}))
        out.append({"steps": target, "test_accuracy": accuracy, "test_loss": loss, "weights": str(path)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def victims(count: int) -> list[tuple[str, int]]:
    """The first test image of each of `count` classes, written as PNG for a folder source."""
    import numpy as np
    from PIL import Image

    _, _, test_x, test_y = task()
    folder = cache_dir() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for c in range(count):
        i = int((test_y == c).nonzero()[0])
        name = f"test-class{c}.png"
        arr = (test_x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / name, format="PNG")
        out.append((name, c))
    return out


def attack(
    weights: str, image: str, label: int, iterations: int, seed: int, arch: str = "convnet", bn: str = "eval"
) -> dict[str, Any]:
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.specs import JobSpec
    from service.storage import LocalStore

    spec = JobSpec.model_validate(
        {
            "model": {**ARCHES[arch], "weights": weights, "init_seed": 0},
            "update": {
                "simulate": {
                    "source": "folder",
                    "path": str(cache_dir() / "images"),
                    "images": [image],
                    "labels": [label],
                    "training": {"bn_mode": bn},
                },
                "client": {"bn_mode": bn},
            },
            "data": {"shape": [3, 32, 32], "num_classes": 10, "normalization": "cifar10", "labels": [label]},
            "knowledge": 1,
            "attack": {"name": "inverting_gradients"},
            "budget": {"iterations": iterations, "restarts": 1},
            "seed": seed,
        }
    )
    store = LocalStore(Path(os.environ.get("TMPDIR", "/tmp")) / "gradleak-bench")
    ctx = JobContext(
        job_id="bench",
        store=store,
        prefix=f"bench/trained-{os.getpid()}",
        resolve=lambda p: Path(p).read_bytes(),
    )
    manifest = run_job(spec, ctx).manifest
    return {
        "image": image,
        "label": label,
        "seed": seed,
        "iterations": manifest["attack"]["iterations"],
        "attack_s": manifest["timings"]["attack_s"],
        **quality_fields(manifest),
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="convnet", choices=sorted(ARCHES))
    ap.add_argument("--bn", default="eval", choices=["eval", "train"], help="the attacked client's BN mode")
    ap.add_argument("--steps", default="0,30,300", help="SGD steps of each checkpoint (0: initialisation)")
    ap.add_argument("--images", type=int, default=4, help="test images attacked (one per class)")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--image-index", type=int, default=None, help="attack only this one of the images")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, default=RESULTS / "attacks-cpu-trained.json")
    ap.add_argument(
        "--reuse", type=Path, action="append", default=[], help="logs of finished runs (JSON lines)"
    )
    ap.add_argument("--skip-missing", action="store_true", help="run no attack: only the --reuse runs count")
    a = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t0 = time.time()
    steps = [int(s) for s in a.steps.split(",")]
    logged = [
        json.loads(line) for f in a.reuse for line in f.read_text().splitlines() if line.startswith("{")
    ]
    trained = {r["steps"]: r for r in logged if "test_accuracy" in r}
    checkpoints = [dict(trained[s]) for s in steps] if set(steps) <= set(trained) else train(steps, a.arch)
    images = victims(a.images)
    if a.image_index is not None:
        images = images[a.image_index : a.image_index + 1]
    for ck in checkpoints:
        runs = []
        for image, label in images:
            for seed in (int(s) for s in a.seeds.split(",")):
                done = [
                    {k: v for k, v in r.items() if k != "steps"}
                    for r in logged
                    if "image" in r and (r["steps"], r["image"], r["seed"]) == (ck["steps"], image, seed)
                ]
                if done or a.skip_missing:
                    runs += done[:1]
                    continue
                r = attack(ck["weights"], image, label, a.iterations, seed, a.arch, a.bn)
                print(json.dumps({"steps": ck["steps"], **r}), file=sys.stderr, flush=True)
                runs.append(r)
        ck["runs"] = runs
        if not runs:
            continue
        ck["psnr_median"] = statistics.median(r["psnr_mean"] for r in runs)
        ck["psnr_mean"] = statistics.fmean(r["psnr_mean"] for r in runs)
        ck["ssim_median"] = statistics.median(r["ssim_mean"] for r in runs)
        ck["weights"] = Path(ck["weights"]).name  # a cache file, regenerated by the same command
    report = {
        **report_header("bench.trained", load_before),
        "training": {
            "arch": a.arch,
            "knobs": ARCHES[a.arch]["knobs"] or "registry defaults",
            "task": f"photo_patches(size=32, per_class={PER_CLASS}, seed=0), 20 % test split (seed 0)",
            "optimiser": f"SGD lr {LR} momentum {MOMENTUM}, batch {BATCH}, seeded order",
            "init_seed": 0,
        },
        "attack": {"name": "inverting_gradients", "settings": "defaults", "iterations": a.iterations},
        "case": {
            "batch": 1,
            "protocol": "fedsgd",
            "bn_mode": a.bn if a.arch == "resnet18" else "no batch norm",
            "labels": "known",
            "images": "test patches, one per class",
        },
        "checkpoints": checkpoints,
        "elapsed_s": time.time() - t0,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

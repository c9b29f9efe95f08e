"""Latent-space attacks (GIA-L: gias, ggl) against the default observable-space attack (GIA-O:
inverting_gradients) at an equal wall-clock budget, in and out of the generator's distribution.

  OMP_NUM_THREADS=1 python -m bench.generative --faces-gen PATH --patches-gen PATH \
      [--budget-s 8] [--seeds 0,1,2] [--out bench/results/generative-cpu.json]

Cases, all FedSGD on 32x32 images, labels known (given to every attack alike), one restart:
- grid: ConvNet (the registry's default convnet) untrained (init seed 0) and early-round (the same
  after EARLY_STEPS SGD steps on the photo-patch task), batch sizes 1, 4 and 16, faces images,
  the faces generator (in-distribution), each attack with the same time limit;
- ood: the untrained ConvNet, batch 1: the faces generator on faces (in-distribution) against
  textures, text and natural photos; the patches generator on photo patches (in-distribution,
  crops the generator never saw) against faces. Inverting Gradients runs on the same images.

Every job runs through the one runner (service.jobs.runner.run_job) in this process, in turn, so
the baseline shares the machine's state. The faces are drawn from EVAL_FACES, those not used to
tune the attacks' defaults (TUNE_FACES) and, for the shipped faces generator, held out of its
training set when its manifest says so. Medians over seeds; iterations reached are reported,
since the machine is shared and a time budget buys fewer iterations under load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIZE = 32
NUM_CLASSES = 10
EARLY_STEPS = 30
ATTACKS = {
    "inverting_gradients": {"name": "inverting_gradients"},
    "gias": {"name": "gias"},
    "ggl": {"name": "ggl"},
}
BATCHES = (1, 4, 16)
# faces 00-19 tune (bench/generative.py --tune); the rest report
TUNE_FACES = [f"face{i:02d}" for i in range(20)]
EVAL_FACES = [f"face{i:02d}" for i in range(20, 100)]
OOD_SETS = {"faces": ["texture", "text", "natural"], "patches": ["faces"]}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "note": "shared with other work (about 8 concurrent workers on 2 cores): wall-clock budgets "
        "buy fewer iterations under load; see iterations per row",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }


def images_of(kind: str, n: int, seed: int, pool: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    """The simulated client's images: a spec fragment and the images (for the figure)."""
    from service.data import load_images, photo_names

    if kind == "patches":
        names = [f"{(seed * 16 + k) % len(pool['patch_files']):04d}.png" for k in range(n)]
        sim = {"source": "folder", "path": str(pool["patch_dir"]), "images": names}
    else:
        if kind == "faces":
            names_all = pool["eval_faces"]
        else:
            category = {"texture": "texture", "text": "text", "natural": "natural"}[kind]
            names_all = photo_names(category)
        start = seed * n
        names = [names_all[(start + k) % len(names_all)] for k in range(n)]
        sim = {"source": "photos", "images": names}
    x, _ = load_images(sim["source"], sim["images"], size=SIZE, channels=3, path=sim.get("path"))
    return sim, x


def early_model(workdir: Path) -> str:
    """The default ConvNet after EARLY_STEPS SGD steps (batch 64, lr 0.05) on the photo-patch
    task: an early-round model. Returns the weights file."""
    from service.data import normalize, photo_patches
    from service.models import build_model
    from service.specs import DataSpec, ModelSpec
    from service.tensorio import save_safetensors_file

    data = DataSpec(shape=(3, SIZE, SIZE), num_classes=NUM_CLASSES)
    model = build_model(ModelSpec(arch="convnet"), data)
    x, y = photo_patches(SIZE, per_class=64, seed=1)
    x = normalize(x, data.resolved_normalization())
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(EARLY_STEPS):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    path = workdir / "convnet_early.safetensors"
    save_safetensors_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    print(f"early-round model: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {EARLY_STEPS} steps", flush=True)
    return str(path)


def run_one(
    *,
    attack: str,
    generator: str | None,
    weights: str | None,
    sim: dict[str, Any],
    n: int,
    seed: int,
    budget_s: float,
    workdir: Path,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.specs import JobSpec
    from service.storage import LocalStore

    labels = [k % NUM_CLASSES for k in range(n)]
    a = dict(ATTACKS[attack])
    if generator is not None and attack != "inverting_gradients":
        a["generator"] = generator
    a.update(params or {})
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "convnet", "weights": weights},
            "update": {"simulate": {**sim, "labels": labels}},
            "data": {"shape": [3, SIZE, SIZE], "num_classes": NUM_CLASSES, "num_images": n, "labels": labels},
            "knowledge": 2,
            "attack": a,
            "budget": {"iterations": 1_000_000, "time_limit_s": budget_s},
            "seed": seed,
            "verdict": {"when": "never"},
        }
    )
    store = LocalStore(workdir / "store")
    ctx = JobContext(
        job_id=f"b{time.monotonic_ns()}", store=store, prefix="jobs/b", resolve=lambda r: Path(r).read_bytes()
    )
    load = os.getloadavg()[0]
    result = run_job(spec, ctx)
    m = result.manifest
    from safetensors.torch import load as load_tensors  # our own output, not an upload

    recon = load_tensors(store.get_bytes(m["artifacts"]["reconstruction.safetensors"]))["images"]
    return {
        "psnr": m["metrics"]["mean"]["psnr"],
        "ssim": m["metrics"]["mean"]["ssim"],
        "iterations": m["attack"]["iterations"],
        "attack_s": round(m["timings"]["attack_s"], 2),
        "best_loss": m["attack"]["best_loss"],
        "load_average_1min_before": load,
        "_recon": recon,
    }


def median_rows(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(keys, key, strict=True))
        for metric in ("psnr", "ssim", "iterations"):
            row[f"{metric}_median"] = round(statistics.median(r[metric] for r in rs), 3)
        row["psnr_per_seed"] = [round(r["psnr"], 2) for r in rs]
        row["seeds"] = len(rs)
        rows.append(row)
    return rows


def figure(panels: list[tuple[str, list[torch.Tensor]]], path: Path) -> None:
    """Rows of 32x32 tiles (label, images) -> a small PNG."""
    from PIL import Image, ImageDraw

    tile, label_w = SIZE * 2, 150
    cols = max(len(imgs) for _, imgs in panels)
    out = Image.new("RGB", (label_w + cols * (tile + 2), len(panels) * (tile + 2)), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, imgs) in enumerate(panels):
        draw.text((4, r * (tile + 2) + tile // 2 - 6), label, fill="black")
        for c, img in enumerate(imgs):
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            pil = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            out.paste(pil, (label_w + c * (tile + 2), r * (tile + 2)))
    out.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces-gen", required=True)
    p.add_argument("--patches-gen", required=True)
    p.add_argument("--budget-s", type=float, default=8.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--out", default=str(RESULTS / "generative-cpu.json"))
    p.add_argument("--skip-ood", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    from service.data import photo_patches
    from service.generators import load_generator_file

    gens = {"faces": args.faces_gen, "patches": args.patches_gen}
    manifests = {k: load_generator_file(v).manifest.model_dump() for k, v in gens.items()}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="gradleak-bench-gen-"))
    # photo patches the patches generator never saw: a seed of its own (the training uses others)
    patch_dir = workdir / "patches"
    patch_dir.mkdir()
    px, _ = photo_patches(SIZE, per_class=8, seed=12345)
    px = px[torch.randperm(len(px), generator=torch.Generator().manual_seed(0))]
    from PIL import Image

    for i, img in enumerate(px):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(patch_dir / f"{i:04d}.png")
    pool = {"patch_dir": patch_dir, "patch_files": list(range(len(px))), "eval_faces": EVAL_FACES}
    models = {"untrained": None, "early": early_model(workdir)}

    runs: list[dict[str, Any]] = []
    panels: list[tuple[str, list[torch.Tensor]]] = []

    def record(case: dict[str, Any], out: dict[str, Any], truth: torch.Tensor, show: bool) -> None:
        recon = out.pop("_recon")
        runs.append({**case, **out})
        print(json.dumps({**case, **{k: out[k] for k in ("psnr", "ssim", "iterations")}}), flush=True)
        if show:
            panels.append((f"{case['attack']} {case['images']}/{case['generator'] or '-'}", list(recon)))

    # the grid: in-distribution (faces generator, faces images)
    for model_name, weights in models.items():
        for n in batches:
            for seed in seeds:
                sim, truth = images_of("faces", n, seed, pool)
                show = model_name == "untrained" and n == 4 and seed == seeds[0]
                if show:
                    panels.append(("truth faces", list(truth)))
                for attack in ATTACKS:
                    gen = None if attack == "inverting_gradients" else "faces"
                    out = run_one(
                        attack=attack, generator=gens.get(gen or ""), weights=weights, sim=sim, n=n,
                        seed=seed, budget_s=args.budget_s, workdir=workdir,
                    )  # fmt: skip
                    case = {"part": "grid", "model": model_name, "batch": n, "seed": seed, "attack": attack,
                            "images": "faces", "generator": gen}  # fmt: skip
                    record(case, out, truth, show)

    # out of distribution: batch 1, untrained model
    if not args.skip_ood:
        for gen_name, others in OOD_SETS.items():
            for images in (gen_name, *others):
                if gen_name == "faces" and images == "faces":
                    continue  # the grid's untrained batch-1 rows
                for seed in seeds:
                    sim, truth = images_of(images, 1, seed, pool)
                    show = seed == seeds[0]
                    if show:
                        panels.append((f"truth {images}", list(truth)))
                    # Inverting Gradients needs no generator: once per image set (faces: the grid's)
                    attacks = ["gias", "ggl"] if images == "faces" else ["inverting_gradients", "gias", "ggl"]
                    for attack in attacks:
                        gen = None if attack == "inverting_gradients" else gen_name
                        out = run_one(
                            attack=attack, generator=gens.get(gen or ""), weights=None, sim=sim, n=1,
                            seed=seed, budget_s=args.budget_s, workdir=workdir,
                        )  # fmt: skip
                        case = {"part": "ood", "model": "untrained", "batch": 1, "seed": seed,
                                "attack": attack,
                                "images": images, "generator": gen}  # fmt: skip
                        record(case, out, truth, show)

    grid = median_rows([r for r in runs if r["part"] == "grid"], ("model", "batch", "attack"))
    ood_runs = [r for r in runs if r["part"] == "ood"] + [
        {**r, "part": "ood"}
        for r in runs
        if r["part"] == "grid" and r["model"] == "untrained" and r["batch"] == 1
    ]
    ood = median_rows(ood_runs, ("images", "attack", "generator"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = Path(args.out).with_suffix(".png")
    figure(panels, png)
    report = {
        "benchmark": "latent-space attacks (gias, ggl) vs inverting_gradients at an equal wall-clock budget",
        "command": "OMP_NUM_THREADS=1 python -m bench.generative "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "load_average_end": os.getloadavg(),
        "budget_s_per_attack": args.budget_s,
        "restarts": 1,
        "labels": "known (given to every attack)",
        "model": "convnet (registry default: width 64, depth 3), CIFAR-10 normalisation, FedSGD",
        "early_round": f"the same ConvNet after {EARLY_STEPS} SGD steps (batch 64, lr 0.05, momentum 0.9) on "
        "the photo-patch task (photo_patches seed 1)",
        "images": {
            "faces": f"{EVAL_FACES[0]}..{EVAL_FACES[-1]} "
            f"(faces {TUNE_FACES[0]}..{TUNE_FACES[-1]} are for tuning)",
            "patches": "photo_patches(32, per_class=8, seed=12345), shuffled: crops the generator's training "
            "did not draw",
            "texture/text/natural": "the shipped photos of those categories, resized to 32x32",
        },
        "generators": manifests,
        "grid_medians": grid,
        "ood_medians": ood,
        "runs": runs,
        "figure": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png),
        "total_s": round(time.monotonic() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out} and {png} in {report['total_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

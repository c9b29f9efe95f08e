"""Latent-space attacks (GIA-L: gias, ggl) against the default observable-space attack (GIA-O:
inverting_gradients) at an equal wall-clock budget, in and out of the generator's distribution.

  OMP_NUM_THREADS=1 python -m bench.generative --faces-gen PATH --patches-gen PATH \
      [--budget-s 8] [--seeds 0,1,2] [--out bench/results/generative-cpu.json]

Cases, all FedSGD on 32x32 images, labels known (given to every attack alike), one restart:
- grid: ConvNet (the registry's default convnet) untrained (init seed 0) and early-round (the same
  after EARLY_STEPS SGD steps on the photo-patch task), batch sizes 1, 4 and 16, faces images,
  the faces generator (in-distribution: faces it was not trained on), each attack with the same
  compute budget (single-thread CPU seconds, turned into iterations by timing probes);
- ood: the untrained ConvNet, batch 1: the faces generator on faces (in-distribution) against
  textures, text and natural photos; the patches generator on photo patches (in-distribution,
  crops the generator never saw) against faces. Inverting Gradients runs on the same images.

The generators (bench/results/generative-gen-{faces,patches}.safetensors, with their sample
grids) were trained for 1500 s each (--time-limit 1500), which reached 2535 and 2523 steps; to
train them again, give those step counts (seeded runs; the face folder holds face00..face59 as
32x32 PNGs):

  gradleak generator train --data folder --path FACES_00_59 --steps 2535 --batch-size 32 \
      --width 16 --ema 0.99 --out OUT_FACES
  gradleak generator train --data patches --per-class 200 --steps 2523 --batch-size 32 \
      --width 16 --ema 0.99 --out OUT_PATCHES

Every job runs through the one runner (service.jobs.runner.run_job) in this process, in turn, so
the baseline shares the machine's state. The generators (DCGAN, width 16) are trained with
`gradleak generator train`: faces on a folder of face00..face59 (TRAIN_FACES), patches on the
photo-patch task (per_class 200, seed 0); the reported faces are face60..face99, which the
generator never saw, and the tuning (--tune) used faces of its training set. Medians over seeds;
iterations and wall-clock seconds of each run are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
# The faces generator is trained on face00..face59 (TRAIN_FACES); faces 00-19 of those tune the
# attacks' defaults (--tune); face60..face99, which the generator never saw, are reported.
TRAIN_FACES = [f"face{i:02d}" for i in range(60)]
TUNE_FACES = TRAIN_FACES[:20]
EVAL_FACES = [f"face{i:02d}" for i in range(60, 100)]
OOD_SETS = {"faces": ["texture", "text", "natural"], "patches": ["faces"]}


def machine() -> dict[str, Any]:
    from bench.attacks import machine as this_machine

    return {
        **this_machine(),
        "note": "shared with other work (about 8 concurrent workers on 2 cores): wall-clock budgets "
        "buy fewer iterations under load; see iterations per row",
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
    iterations: int,
    workdir: Path,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One job through the runner, bounded by `iterations`; its process CPU time is measured."""
    from safetensors.torch import load as load_tensors  # our own output, not an upload

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
            "budget": {"iterations": iterations},
            "seed": seed,
            "verdict": {"when": "never"},
        }
    )
    store = LocalStore(workdir / "store")
    ctx = JobContext(
        job_id=f"b{time.monotonic_ns()}", store=store, prefix="jobs/b", resolve=lambda r: Path(r).read_bytes()
    )
    load = os.getloadavg()[0]
    cpu = time.process_time()
    result = run_job(spec, ctx)
    cpu = time.process_time() - cpu
    m = result.manifest
    recon = load_tensors(store.get_bytes(m["artifacts"]["reconstruction.safetensors"]))["images"]
    return {
        "psnr": m["metrics"]["mean"]["psnr"],
        "ssim": m["metrics"]["mean"]["ssim"],
        "iterations": m["attack"]["iterations"],
        "attack_wall_s": round(m["timings"]["attack_s"], 2),
        "job_cpu_s": round(cpu, 2),
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


def plan(seeds: list[int], batches: list[int], ood: bool) -> list[dict[str, Any]]:
    """Every run of the benchmark, in order."""
    runs = []
    for model in ("untrained", "early"):
        for n in batches:
            for seed in seeds:
                for attack in ATTACKS:
                    gen = None if attack == "inverting_gradients" else "faces"
                    runs.append({"part": "grid", "model": model, "batch": n, "seed": seed, "attack": attack,
                                 "images": "faces", "generator": gen})  # fmt: skip
    if ood:
        for gen_name, others in OOD_SETS.items():
            for images in (gen_name, *others):
                if gen_name == "faces" and images == "faces":
                    continue  # the grid's untrained batch-1 runs
                for seed in seeds:
                    # Inverting Gradients needs no generator: once per image set (faces: the grid's)
                    attacks = ["gias", "ggl"] if images == "faces" else list(ATTACKS)
                    for attack in attacks:
                        gen = None if attack == "inverting_gradients" else gen_name
                        runs.append({"part": "ood", "model": "untrained", "batch": 1, "seed": seed,
                                     "attack": attack, "images": images, "generator": gen})  # fmt: skip
    return runs


TUNE_CONFIGS = [
    ("gias", {}),
    ("gias", {"latent_lr": 0.02}),
    ("gias", {"latent_lr": 0.1}),
    ("gias", {"generator_lr": 1e-3}),
    ("ggl", {}),
    ("ggl", {"sigma": 0.3}),
    ("ggl", {"sigma": 1.0}),
]


def tune(args: argparse.Namespace) -> int:
    """The attacks' defaults against a few alternatives on the tuning faces (TUNE_FACES), untrained
    model, the given batch sizes, iteration counts from the CPU budget as in the benchmark."""
    workdir = Path(tempfile.mkdtemp(prefix="gradleak-bench-gen-tune-"))
    pool = {"eval_faces": TUNE_FACES}
    rows = []
    per_iteration: dict[str, float] = {}
    for attack, params in TUNE_CONFIGS:
        for n in [int(b) for b in args.batches.split(",")]:
            key = f"b{n}/{attack}/{json.dumps(params)}"
            sim, _ = images_of("faces", n, 99, pool)
            cpu = [
                run_one(attack=attack, generator=args.faces_gen, weights=None, sim=sim, n=n, seed=99,
                        iterations=k, workdir=workdir, params=params)["job_cpu_s"]
                for k in PROBE
            ]  # fmt: skip
            per_iteration[key] = max((cpu[1] - cpu[0]) / (PROBE[1] - PROBE[0]), 1e-4)
            its = max(2, round(args.budget_cpu_s / per_iteration[key]))
            for seed in (0, 1):
                sim, _ = images_of("faces", n, seed, pool)
                out = run_one(attack=attack, generator=args.faces_gen, weights=None, sim=sim, n=n, seed=seed,
                              iterations=its, workdir=workdir, params=params)  # fmt: skip
                out.pop("_recon")
                rows.append({"attack": attack, "params": params, "batch": n, "seed": seed, **out})
                print(json.dumps(rows[-1]), flush=True)
    summary = median_rows(
        [{**r, "config": f"{r['attack']} {json.dumps(r['params'])}"} for r in rows], ("config", "batch")
    )
    out_path = Path(args.out).with_name("generative-cpu-tune.json")
    out_path.write_text(
        json.dumps(
            {
                "purpose": "choose the attacks' defaults on tuning faces (face00..face19), "
                "not the reported ones",
                "command": "OMP_NUM_THREADS=1 python -m bench.generative --tune --faces-gen PATH "
                f"--patches-gen PATH --budget-cpu-s {args.budget_cpu_s} --batches {args.batches}",
                "machine": machine(),
                "load_average_end": os.getloadavg(),
                "generator": _manifest(args.faces_gen),
                "medians": summary,
                "runs": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out_path}")
    return 0


PROBE = (2, 12)  # iterations of the two timing probes (their difference cancels the setup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces-gen", required=True)
    p.add_argument("--patches-gen", required=True)
    p.add_argument("--budget-cpu-s", type=float, default=5.0, help="single-thread CPU seconds per attack")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th run from the i-th (then --merge)")
    p.add_argument("--out", default=str(RESULTS / "generative-cpu.json"))
    p.add_argument("--skip-ood", action="store_true")
    p.add_argument("--merge", nargs="*", help="partial JSON files of the shards to merge into --out")
    p.add_argument("--tune", action="store_true", help="compare defaults on the tuning faces instead")
    p.add_argument("--table", action="store_true", help="print --out's medians as Markdown tables")
    args = p.parse_args(argv)
    if args.table:
        print(tables(json.loads(Path(args.out).read_text())))
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.merge:
        return merge(args, argv)
    if args.tune:
        return tune(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    shard, shards = (int(v) for v in args.shard.split("/"))

    from PIL import Image

    from service.data import photo_patches

    gens = {"faces": args.faces_gen, "patches": args.patches_gen}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="gradleak-bench-gen-"))
    # photo patches the patches generator never saw: a seed of its own (the training uses others)
    patch_dir = workdir / "patches"
    patch_dir.mkdir()
    px, _ = photo_patches(SIZE, per_class=8, seed=12345)
    px = px[torch.randperm(len(px), generator=torch.Generator().manual_seed(0))]
    for i, img in enumerate(px):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(patch_dir / f"{i:04d}.png")
    pool = {"patch_dir": patch_dir, "patch_files": list(range(len(px))), "eval_faces": EVAL_FACES}
    models = {"untrained": None, "early": early_model(workdir)}

    # the compute budget in iterations, per (model, batch, attack): CPU seconds per iteration from
    # two probes in this process (the second minus the first cancels setup and scoring)
    per_iteration: dict[str, float] = {}

    def iterations_for(model: str, n: int, attack: str, generator: str | None) -> int:
        key = f"{model}/b{n}/{attack}"
        if key not in per_iteration:
            sim, _ = images_of("faces", n, 99, pool)
            cpu = [
                run_one(attack=attack, generator=generator, weights=models[model], sim=sim, n=n, seed=99,
                        iterations=k, workdir=workdir)["job_cpu_s"]
                for k in PROBE
            ]  # fmt: skip
            per_iteration[key] = max((cpu[1] - cpu[0]) / (PROBE[1] - PROBE[0]), 1e-4)
            print(f"probe {key}: {per_iteration[key]:.4f} CPU s/iteration", flush=True)
        return max(2, round(args.budget_cpu_s / per_iteration[key]))

    todo = plan(seeds, batches, not args.skip_ood)[shard::shards]
    runs: list[dict[str, Any]] = []
    for case in todo:
        gen_path = gens[case["generator"]] if case["generator"] else None
        sim, truth = images_of(case["images"], case["batch"], case["seed"], pool)
        its = iterations_for(case["model"], case["batch"], case["attack"], gens["faces"])
        out = run_one(
            attack=case["attack"], generator=gen_path, weights=models[case["model"]], sim=sim,
            n=case["batch"], seed=case["seed"], iterations=its, workdir=workdir,
        )  # fmt: skip
        recon = out.pop("_recon")
        untrained = case["model"] == "untrained"
        show = case["seed"] == seeds[0] and (case["part"] == "ood" or (untrained and case["batch"] in (1, 4)))
        row = {**case, **out}
        if show:
            row["_recon"] = recon.tolist()
            row["_truth"] = truth.tolist()
        runs.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    partial = {
        "shard": args.shard,
        "per_iteration_cpu_s": per_iteration,
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
        "load_average_end": os.getloadavg(),
        "generators": {k: _manifest(v) for k, v in gens.items()},
    }
    path = Path(args.out).with_suffix(f".shard{shard}.json") if shards > 1 else workdir / "partial.json"
    path.write_text(json.dumps(partial))
    print(f"wrote {path}")
    if shards == 1:
        args.merge = [str(path)]
        return merge(args, argv)
    return 0


def tables(report: dict[str, Any]) -> str:
    """docs/generators.md's tables: PSNR / SSIM medians (iterations) per case and attack."""
    attacks = list(ATTACKS)
    lines = ["| model | batch | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    grid = {(r["model"], r["batch"], r["attack"]): r for r in report["grid_medians"]}
    for model in ("untrained", "early"):
        for n in sorted({k[1] for k in grid}):
            cells = []
            for a in attacks:
                r = grid.get((model, n, a))
                cells.append(
                    "-"
                    if r is None
                    else f"{r['psnr_median']:.1f} / {r['ssim_median']:.2f} ({r['iterations_median']:.0f})"
                )
            lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "| images | generator | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    ood = {(r["images"], r["generator"], r["attack"]): r for r in report["ood_medians"]}
    for gen, images in (("faces", "faces"), ("faces", "texture"), ("faces", "text"), ("faces", "natural"),
                        ("patches", "patches"), ("patches", "faces")):  # fmt: skip
        cells = []
        for a in attacks:
            r = ood.get((images, None if a == "inverting_gradients" else gen, a))
            cells.append("-" if r is None else f"{r['psnr_median']:.1f} / {r['ssim_median']:.2f}")
        lines.append(f"| {images} | {gen} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _manifest(path: str) -> dict[str, Any]:
    from service.generators import load_generator_file

    return load_generator_file(path).manifest.model_dump()


def merge(args: argparse.Namespace, argv: list[str] | None) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    runs = [r for part in parts for r in part["runs"]]
    per_iteration: dict[str, list[float]] = {}
    for part in parts:
        for k, v in part["per_iteration_cpu_s"].items():
            per_iteration.setdefault(k, []).append(round(v, 4))
    panels: list[tuple[str, list[torch.Tensor]]] = []
    order = sorted(
        (r for r in runs if "_recon" in r),
        key=lambda r: (
            r["part"],
            r["images"],
            r["batch"],
            list(ATTACKS).index(r["attack"]),
            r["generator"] or "",
        ),
    )
    shown_truth: set[tuple] = set()
    for r in order:
        key = (r["part"], r["images"], r["batch"])
        if key not in shown_truth:
            shown_truth.add(key)
            panels.append((f"truth {r['images']} b{r['batch']}", list(torch.tensor(r["_truth"]))))
        panels.append((f"{r['attack']} G={r['generator'] or '-'}", list(torch.tensor(r["_recon"]))))
    for r in runs:
        r.pop("_recon", None)
        r.pop("_truth", None)
    grid = median_rows([r for r in runs if r["part"] == "grid"], ("model", "batch", "attack"))
    ood_runs = [r for r in runs if r["part"] == "ood"] + [
        r for r in runs if r["part"] == "grid" and r["model"] == "untrained" and r["batch"] == 1
    ]
    ood = median_rows(ood_runs, ("images", "generator", "attack"))
    png = Path(args.out).with_suffix(".png")
    figure(panels, png)
    report = {
        "benchmark": "latent-space attacks (gias, ggl) vs inverting_gradients at an equal compute budget, "
        "in and out of the generator's distribution",
        "command": "OMP_NUM_THREADS=1 python -m bench.generative --faces-gen PATH --patches-gen PATH "
        f"--budget-cpu-s {args.budget_cpu_s} --seeds {args.seeds} --batches {args.batches} (--shard i/n "
        "in n processes, then --merge their files)",
        "machine": machine(),
        "load_average_end_of_shards": [part["load_average_end"] for part in parts],
        "wall_s_of_shards": [part["wall_s"] for part in parts],
        "budget": f"{args.budget_cpu_s} s of single-thread CPU time per attack run (OMP_NUM_THREADS=1), "
        "turned "
        "into an iteration count per (model, batch, attack) by two timing probes in the same process; "
        "the machine is shared, so a wall-clock budget would buy each attack a different amount of "
        "compute. Each run's wall-clock attack time and iterations are in `runs`",
        "per_iteration_cpu_s": per_iteration,
        "restarts": 1,
        "labels": "known (given to every attack)",
        "model": "convnet (registry default: width 64, depth 3), CIFAR-10 normalisation, FedSGD",
        "early_round": f"the same ConvNet after {EARLY_STEPS} SGD steps (batch 64, lr 0.05, momentum 0.9) on "
        "the photo-patch task (photo_patches seed 1)",
        "images": {
            "faces": f"{EVAL_FACES[0]}..{EVAL_FACES[-1]}, held out of the faces generator's training "
            f"({TRAIN_FACES[0]}..{TRAIN_FACES[-1]}); {TUNE_FACES[0]}..{TUNE_FACES[-1]} tuned the defaults",
            "patches": "photo_patches(32, per_class=8, seed=12345), shuffled: crops the generator's training "
            "did not draw",
            "texture/text/natural": "the shipped photos of those categories, resized to 32x32",
        },
        "generators": parts[0]["generators"],
        "grid_medians": grid,
        "ood_medians": ood,
        "runs": runs,
        "figure": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png),
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

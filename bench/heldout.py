"""The default attack on images no tuning touched, against breaching on the same model and gradient.

The default Inverting Gradients settings were first tuned on four photos (astronaut, coffee,
chelsea, rocket). This benchmark splits the shipped images into a TUNING set, the only images any
sweep of the default may look at, and a HELD-OUT set that no tuning uses:

- natural photos: scikit-image photos (tuning) and other photos, scientific images and a texture
  (held out);
- faces: LFW crop 0 (tuning), 50 (held out);
- the photo-patch task (service.data.patches): crops drawn with seed 0 (tuning) and seed 1
  (held out), from other classes.

Case: ResNet-18 (CIFAR stem, untrained, init seed 0, BN in eval mode as breaching's honest server
makes its clients), batch 1, 32x32, CIFAR-10 normalisation, FedSGD, labels known. Each image is
attacked by gradleak (through the job runner, as `bench.attacks`) and by breaching 0.1.2's
OptimizationBasedAttacker (bench/peer.py's setup) on the same model and the same gradient, each in
its own single-threaded process, both scored by gradleak's PSNR and SSIM.

  python -m bench.heldout sweep --set tuning --iterations 300 --variant '{}' \\
      --variant '{"tv_weight": 4e-4}' --peer ig_tv5e-4 --jobs 2 --out /tmp/sweep.json
  python -m bench.heldout report --iterations 1000 --peer ig_tv5e-4 --wallclock --jobs 2 \\
      --out bench/results/attacks-cpu-heldout.json

`sweep` runs every variant (JSON Inverting Gradients parameters laid over the default) and peer
configuration on one set; `report` runs the default and the chosen peer configuration on both
sets, and with --wallclock gradleak once more on each image with breaching's own attack time as
its time limit (equal wall-clock, same process pool, same load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import peer
from bench.attacks import RESULTS, ROOT, append_row, machine

TUNING = ["astronaut", "chelsea", "camera", "face00", "patch:0:0", "patch:0:5"]
HELDOUT = ["clock", "immunohistochemistry", "gravel", "face50", "patch:1:7", "patch:1:8"]
SETS = {"heldout": HELDOUT, "tuning": TUNING}
# patch:<seed>:<class>: the first crop of that class of photo_patches(seed=<seed>)
PATCH_PER_CLASS = 4

# breaching's Inverting Gradients (global cosine, signed Adam, step decay, normal start) at TV weights
PEER_TV = {"ig_tv1e-4": 1e-4, "ig_tv5e-4": 5e-4, "ig_tv2e-3": 2e-3, "ig_tv1e-2": 1e-2}

CASE = {"arch": "resnet18", "knobs": {"stem": "cifar"}, "bn": "eval"}


def cache_dir() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "gradleak-bench" / "heldout-images"


def image_source(ref: str) -> tuple[str, str, str | None]:
    """(source, image name, path) of an image reference; patches are written once as PNG files."""
    if not ref.startswith("patch:"):
        return "photos", ref, None
    _, seed, label = ref.split(":")
    folder = cache_dir()
    name = f"patch-{seed}-{label}.png"
    if not (folder / name).exists():
        import numpy as np
        from PIL import Image

        from service.data.patches import photo_patches

        images, _ = photo_patches(size=32, per_class=PATCH_PER_CLASS, seed=int(seed))
        folder.mkdir(parents=True, exist_ok=True)
        arr = (images[int(label) * PATCH_PER_CLASS].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        tmp = folder / f".{name}.{os.getpid()}"
        Image.fromarray(arr).save(tmp, format="PNG")
        tmp.replace(folder / name)
    return "folder", name, str(folder)


def spec_for(
    ref: str, label: int, attack: dict[str, Any], iterations: int, time_limit: float | None, seed: int
):
    from service.specs import JobSpec

    source, name, path = image_source(ref)
    # with a time limit, `iterations` is only a cap far above what the time allows (the job
    # runner takes the budget as given: the server's time_bound is not applied to it), so that the
    # run and its schedule follow the clock
    budget: dict[str, Any] = {"restarts": 1, "time_limit_s": time_limit, "iterations": iterations}
    return JobSpec.model_validate(
        {
            "model": {"arch": CASE["arch"], "knobs": CASE["knobs"], "init_seed": 0},
            "update": {
                "simulate": {
                    "source": source,
                    "images": [name],
                    "path": path,
                    "labels": [label],
                    "training": {"bn_mode": CASE["bn"]},
                },
                "client": {"bn_mode": CASE["bn"]},
            },
            "data": {"shape": [3, 32, 32], "num_classes": 10, "normalization": "cifar10", "labels": [label]},
            "knowledge": 1,
            "attack": attack,
            "budget": budget,
            "seed": seed,
        }
    )


def run_ours(ref: str, label: int, iterations: int, variant: dict[str, Any], seed: int, limit: float | None):
    import torch

    from bench.attacks import quality_fields, run_spec

    spec = spec_for(ref, label, {"name": "inverting_gradients", **variant}, iterations, limit, seed)
    manifest = run_spec(spec, f"heldout-{os.getpid()}")
    attack_s = manifest["timings"]["attack_s"]
    its = manifest["attack"]["iterations"]
    return {
        "who": "gradleak",
        "image": ref,
        "variant": variant,
        "seed": seed,
        "time_limit_s": limit,
        "iterations": its,
        "attack_s": attack_s,
        "s_per_iteration": attack_s / its,
        **quality_fields(manifest),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_after": os.getloadavg()[0],
    }


def run_peer(
    ref: str, label: int, iterations: int, config: str, seed: int, bn: str = CASE["bn"]
) -> dict[str, Any]:
    """breaching's Inverting Gradients on gradleak's model and gradient for this image.

    `bn` is the client's BN mode; breaching attacks a train-mode client when the server's payload
    carries no buffers (it then keeps its copy of the model in train mode).
    """
    import contextlib
    import io

    import torch
    import torch.nn.functional as F

    from service.data import load_images, normalize
    from service.fl.client import training_mode
    from service.metrics import score
    from service.models import build_model

    with contextlib.redirect_stdout(io.StringIO()):  # breaching prints its banners
        import breaching

    spec = spec_for(ref, label, {"name": "inverting_gradients"}, iterations, None, seed)
    sim = spec.update.simulate
    model = build_model(spec.model, spec.data)
    norm = spec.data.resolved_normalization()
    truth, _ = load_images(sim.source, sim.images, size=32, channels=3, path=sim.path)
    labels = torch.tensor(sim.labels)
    with training_mode(model, bn):
        grads = torch.autograd.grad(
            F.cross_entropy(model(normalize(truth, norm)), labels), list(model.parameters())
        )
    tv = PEER_TV[config]
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = breaching.get_attack_config(
            "invertinggradients",
            overrides=[f"regularization.total_variation.scale={tv}", f"optim.max_iterations={iterations}"],
        )
    cfg.optim.callback = 10**9
    setup = {"device": torch.device("cpu"), "dtype": torch.float32}
    attacker = breaching.attacks.prepare_attack(
        model, torch.jit.script(torch.nn.CrossEntropyLoss()), cfg, setup
    )

    class Metadata(dict):  # breaching reads server metadata by attribute
        __getattr__ = dict.__getitem__

    metadata = Metadata(
        shape=(3, 32, 32), mean=norm.mean, std=norm.std, modality="vision", task="classification", classes=10
    )
    payload = [
        {
            "parameters": [p.detach() for p in model.parameters()],
            "buffers": [b.detach().clone() for b in model.buffers()] if bn == "eval" else None,
            "metadata": metadata,
        }
    ]
    shared = [
        {
            "gradients": [g.detach() for g in grads],
            "buffers": None,
            "metadata": {"num_data_points": 1, "labels": labels, "local_hyperparams": None},
        }
    ]
    torch.manual_seed(seed)  # breaching draws its start from the global generator
    t0 = time.perf_counter()
    out, _ = attacker.reconstruct(payload, shared, server_secrets={}, dryrun=False)
    attack_s = time.perf_counter() - t0
    mean = torch.tensor(norm.mean).view(1, -1, 1, 1)
    std = torch.tensor(norm.std).view(1, -1, 1, 1)
    recon = (out["data"].detach() * std + mean).clamp(0, 1)
    m = score(recon, truth)
    return {
        "who": "breaching",
        "image": ref,
        "config": config,
        "breaching_config": ["invertinggradients", f"regularization.total_variation.scale={tv}"],
        "bn_mode": bn,
        "seed": seed,
        "iterations": iterations,
        "attack_s": attack_s,
        "s_per_iteration": attack_s / iterations,
        "psnr_mean": m["mean"]["psnr"],
        "ssim_mean": m["mean"]["ssim"],
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_after": os.getloadavg()[0],
    }


def subprocess_one(args: list[str], with_peer: bool) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if with_peer:
        env["PYTHONPATH"] = os.pathsep.join([str(peer.PEER_DIR), env.get("PYTHONPATH", ""), str(ROOT)])
    cmd = [sys.executable, "-m", "bench.heldout", "one", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def label_of(ref: str, images: list[str]) -> int:
    return images.index(ref) % 10


def ours_task(ref: str, label: int, its: int, variant: dict[str, Any], seed: int, limit: float | None = None):
    return lambda: subprocess_one(
        ["ours", ref, str(label), str(its), json.dumps(variant), str(seed), str(limit or 0)], False
    )


def peer_task(ref: str, label: int, its: int, config: str, seed: int):
    return lambda: subprocess_one(["peer", ref, str(label), str(its), config, str(seed)], True)


def run_all(tasks: list[Any], jobs: int, log: Path | None = None) -> list[dict[str, Any]]:
    def go(task: Any) -> dict[str, Any]:
        r = task()
        print(json.dumps(r), file=sys.stderr, flush=True)
        if log is not None:
            append_row(log, r)
        return dict(r)

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(go, tasks))


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Finished runs from a log of JSON lines (this benchmark's --log, or its stderr)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if r.get("who") in ("gradleak", "breaching"):
                rows.append(r)
    return rows


def same_run(r: dict[str, Any], what: dict[str, Any], iterations: int, seed: int) -> bool:
    if r["who"] != what["who"] or r["image"] != what["image"] or r["seed"] != seed:
        return False
    if r["who"] == "breaching":
        return bool(r["config"] == what["config"] and r["iterations"] == iterations)
    return bool(
        r["variant"] == what["variant"] and not r.get("time_limit_s") and r["iterations"] == iterations
    )


def _same_wallclock(r: dict[str, Any], image: str, variant: dict[str, Any], seed: int) -> bool:
    """A finished equal-wall-clock run of gradleak on this image (--reuse)."""
    return bool(
        r["who"] == "gradleak"
        and r["image"] == image
        and r["variant"] == variant
        and r["seed"] == seed
        and r.get("time_limit_s")
    )


def key(r: dict[str, Any]) -> str:
    if r["who"] == "breaching":
        return f"breaching {r['config']}"
    tag = json.dumps(r["variant"], sort_keys=True)
    return f"gradleak {tag}" + (" equal wall-clock" if r.get("time_limit_s") else "")


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return {
        k: {
            "images": len(v),
            "psnr_median": statistics.median(r["psnr_mean"] for r in v),
            "psnr_mean": statistics.fmean(r["psnr_mean"] for r in v),
            "ssim_median": statistics.median(r["ssim_mean"] for r in v),
            "iterations_median": statistics.median(r["iterations"] for r in v),
            "s_per_iteration_median": statistics.median(r["s_per_iteration"] for r in v),
        }
        for k, v in groups.items()
    }


def head_to_head(rows: list[dict[str, Any]], ours: str, theirs: str) -> dict[str, Any]:
    """Per-image PSNR and SSIM differences, gradleak minus breaching."""
    a = {r["image"]: r for r in rows if key(r) == ours}
    b = {r["image"]: r for r in rows if key(r) == theirs}
    common = [i for i in a if i in b]
    if not common:
        return {}
    d_psnr = [a[i]["psnr_mean"] - b[i]["psnr_mean"] for i in common]
    d_ssim = [a[i]["ssim_mean"] - b[i]["ssim_mean"] for i in common]
    return {
        "ours": ours,
        "theirs": theirs,
        "per_image_psnr_difference": dict(zip(common, d_psnr, strict=True)),
        "psnr_difference_mean": statistics.fmean(d_psnr),
        "psnr_difference_median": statistics.median(d_psnr),
        "ssim_difference_mean": statistics.fmean(d_ssim),
        "images_ahead": sum(d > 0 for d in d_psnr),
        "images": len(common),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["sweep", "report", "one"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--set", choices=list(SETS), default="tuning", help="`sweep`: the images")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=None, help="JSON attack parameters (repeatable)")
    ap.add_argument(
        "--peer", action="append", default=None, help=f"breaching configurations: {', '.join(PEER_TV)}"
    )
    ap.add_argument("--wallclock", action="store_true", help="`report`: also gradleak at breaching's time")
    ap.add_argument(
        "--wallclock-sets",
        default="heldout,tuning",
        help="`report`: the sets --wallclock runs on (comma-separated)",
    )
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--heldout-variants", type=int, default=1, help="`report`: leading variants run on held-out"
    )
    ap.add_argument("--images", default=None, help="only these images of the sets (comma-separated)")
    ap.add_argument("--peers-only", action="store_true", help="run breaching alone (reused runs still count)")
    ap.add_argument("--reuse", type=Path, default=None, help="JSON lines of finished runs to reuse")
    ap.add_argument("--skip-missing", action="store_true", help="run nothing: report the --reuse runs alone")
    ap.add_argument("--log", type=Path, default=None, help="append each finished run here as a JSON line")
    ap.add_argument("--out", type=Path, default=RESULTS / "attacks-cpu-heldout.json")
    a = ap.parse_args()
    if a.mode == "one":
        who, ref, label, its, what, seed = a.args[:6]
        if who == "ours":
            limit = float(a.args[6]) or None
            r = run_ours(ref, int(label), int(its), json.loads(what), int(seed), limit)
        else:
            r = run_peer(ref, int(label), int(its), what, int(seed))
        print(json.dumps(r))
        return
    peers = a.peer or []
    for p in peers:
        if p not in PEER_TV:
            ap.error(f"unknown --peer {p}; valid: {', '.join(PEER_TV)}")
    if peers and not peer.available():
        ap.error("breaching is not installed: run `make bench-peer`")
    variants = [json.loads(v) for v in a.variant or ["{}"]]
    t0 = time.time()
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {
            **machine(),
            "torch_threads": 1,
            "parallel_runs": a.jobs,
            "note": "2 cores shared with other work; wall-clock figures carry that load",
            "load_average_before": load_before,
        },
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "-m", "bench.heldout", *sys.argv[1:]]),
        "case": {**CASE, "batch": 1, "labels": "known", "image_side": 32, "protocol": "fedsgd"},
        "sets": SETS,
        "peer": peer.PEER_VERSION,
        "peer_tv_weights": {p: PEER_TV[p] for p in peers},
        "iterations": a.iterations,
        "seed": a.seed,
    }
    reuse = load_rows(a.reuse) if a.reuse else []
    sets = {a.set: SETS[a.set]} if a.mode == "sweep" else dict(SETS)
    if a.images:  # a subset of the images (of either set)
        sets = {name: [i for i in images if i in a.images.split(",")] for name, images in sets.items()}
    plan: list[tuple[str, dict[str, Any]]] = []  # (set, what) in priority order: the default first
    for n, variant in enumerate(variants):
        for name, images in sets.items():
            if a.peers_only or (name == "heldout" and n >= a.heldout_variants):
                continue
            plan += [(name, {"who": "gradleak", "image": i, "variant": variant}) for i in images]
        if n == 0:
            for p in peers:
                for name, images in sets.items():
                    plan += [(name, {"who": "breaching", "image": i, "config": p}) for i in images]
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
    not_run: list[dict[str, Any]] = []
    tasks = []
    for name, what in plan:
        images = sets[name]
        done = next((r for r in reuse if same_run(r, what, a.iterations, a.seed)), None)
        if done is not None:
            rows[name].append(done)
            continue
        if a.skip_missing:
            not_run.append({"set": name, **what})
            continue
        label = label_of(what["image"], images)
        task = (
            ours_task(what["image"], label, a.iterations, what["variant"], a.seed)
            if what["who"] == "gradleak"
            else peer_task(what["image"], label, a.iterations, what["config"], a.seed)
        )
        tasks.append((name, task))
    for (name, _), r in zip(tasks, run_all([t for _, t in tasks], a.jobs, a.log), strict=True):
        rows[name].append(r)
    if a.wallclock and peers:  # gradleak's default with breaching's attack time on each image
        extra = []
        for name, images in sets.items():
            if name not in a.wallclock_sets.split(","):
                continue
            took = {r["image"]: r["attack_s"] for r in rows[name] if key(r) == f"breaching {peers[0]}"}
            for i in images:
                done = next((r for r in reuse if _same_wallclock(r, i, variants[0], a.seed)), None)
                if done is not None:
                    rows[name].append(done)
                elif not a.skip_missing:
                    extra.append(
                        (name, ours_task(i, label_of(i, images), 10**6, variants[0], a.seed, took[i]))
                    )
        for (name, _), r in zip(extra, run_all([t for _, t in extra], a.jobs, a.log), strict=True):
            rows[name].append(r)
    sections = {}
    for name in sets:
        ours = key({"who": "gradleak", "variant": variants[0]})
        versus = {}
        for v in variants[: len(variants) if name == "tuning" else a.heldout_variants]:
            mine = key({"who": "gradleak", "variant": v})
            for p in peers:
                versus[f"{mine} vs {p}, iteration-matched"] = head_to_head(rows[name], mine, f"breaching {p}")
            if v != variants[0]:
                versus[f"{mine} vs {ours}"] = head_to_head(rows[name], mine, ours)
        if a.wallclock and peers and name in a.wallclock_sets.split(","):
            versus[f"{ours} vs {peers[0]}, equal wall-clock"] = head_to_head(
                rows[name], ours + " equal wall-clock", f"breaching {peers[0]}"
            )
        sections[name] = {
            "images": sets[name],
            "medians": medians(rows[name]),
            "versus": versus,
            "runs": rows[name],
        }
    report["results"] = sections
    if not_run:
        report["not_run"] = not_run
    report["machine"]["load_average_after"] = os.getloadavg()
    report["elapsed_s"] = time.time() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

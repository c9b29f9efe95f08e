"""Train-mode BN benchmark: ResNet-18 clients that normalise with their own batch statistics.

ResNet-18 (CIFAR stem), 32x32, untrained (init seed 0), FedSGD, labels known, the client's BN in
train mode. Each case runs the default attack at the same iteration count under three configs:
`before` (neither train-mode path: `scale_invariance: off`, `stage_map: off`), `after` (the
scale-blind path alone, `stage_map: off`) and `stage_map` (the default: the scale-blind path and
the stage map read from the third stage's gradients, service/attacks/stage_map.py). Images: the
tuning photos (astronaut, coffee, chelsea, rocket), on which the default attack's settings were
chosen, and held-out ones no setting was chosen on (faces, a grayscale photo, scientific RGB
images). The stage-map path has no settings of its own.

  python -m bench.trainbn --iterations 1500 --seeds 0,1 --parallel 2
  python -m bench.trainbn figure stage_map 0 astronaut camera face00   # the runs' grids side by side

`--configs` may also name the GradInversion variants (CONFIGS: the client's batch statistics as a
prior, knowledge level 4) and `breaching`: breaching 0.1.2's Inverting Gradients (TV 5e-4, its best on
the eval-mode tuning images, bench.heldout) on the same model, gradient and batch-1 images, with
its model in train mode too (`make bench-peer` installs it).

Every run is its own subprocess; `--parallel` runs that many at once (the machine is shared, so
per-iteration times are noisy; the comparison is iteration-matched). Writes
bench/results/attacks-cpu-trainbn.json with the machine, the load, every run and the medians.
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

from bench.attacks import machine, quality_fields, run_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

TUNING = ["astronaut", "coffee", "chelsea", "rocket"]
HELD_OUT = [
    "face00",
    "face07",
    "camera",
    "immunohistochemistry",
    "retina",
    "face21",
    "hubble_deep_field",
    "face42",
]
LABELS = [1, 3, 5, 8]
CONFIGS: dict[str, dict[str, Any]] = {
    # the attack before either train-mode path, and with the scale-blind path alone
    "before": {"name": "inverting_gradients", "scale_invariance": "off", "stage_map": "off"},
    "after": {"name": "inverting_gradients", "stage_map": "off"},
    # the default: the scale-blind path and the stage map read from the third stage's gradients
    "stage_map": {"name": "inverting_gradients"},
    # GradInversion pulls the reconstruction's BN statistics towards the client's batch's (at
    # knowledge level 4: a FedAvg update's running statistics imply them), at three weights
    "gradinversion": {"name": "gradinversion"},
    "gradinversion_bn0.1": {"name": "gradinversion", "bn_weight": 0.1},
    "gradinversion_bn1": {"name": "gradinversion", "bn_weight": 1.0},
}


def spec_for(images: list[str], config: str, iterations: int, seed: int) -> Any:
    from service.specs import JobSpec

    labels = LABELS[: len(images)]
    return JobSpec.model_validate(
        {
            "model": {"arch": "resnet18", "knobs": {"stem": "cifar"}, "init_seed": 0},
            "update": {
                "simulate": {"images": images, "labels": labels, "training": {"bn_mode": "train"}},
                "client": {"bn_mode": "train"},
            },
            "data": {"shape": [3, 32, 32], "num_classes": 10, "normalization": "cifar10", "labels": labels},
            "knowledge": 4 if CONFIGS[config]["name"] == "gradinversion" else 1,
            "attack": CONFIGS[config],
            "budget": {"iterations": iterations, "restarts": 1},
            "seed": seed,
        }
    )


def run_one(images: list[str], config: str, iterations: int, seed: int) -> dict[str, Any]:
    spec = spec_for(images, config, iterations, seed)
    manifest = run_spec(spec, f"trainbn-{config}-{'-'.join(images)}-{seed}")
    a = manifest["attack"]
    return {
        "images": images,
        "config": config,
        "seed": seed,
        "iterations": a["iterations"],
        "attack_s": manifest["timings"]["attack_s"],
        "s_per_iteration": manifest["timings"]["attack_s"] / max(a["iterations"], 1),
        "scale_invariance": a["details"].get("scale_invariance"),
        "stage_map": a["details"].get("stage_map"),
        **quality_fields(manifest),
        "load_average_after": list(os.getloadavg()),
    }


PEER = "breaching"


def run_peer_one(images: list[str], iterations: int, seed: int) -> dict[str, Any]:
    from bench.heldout import run_peer

    (image,) = images
    r = run_peer(image, LABELS[0], iterations, "ig_tv5e-4", seed, bn="train")
    return {
        "images": images,
        "config": PEER,
        "seed": seed,
        "iterations": iterations,
        "attack_s": r["attack_s"],
        "s_per_iteration": r["s_per_iteration"],
        "breaching_config": r["breaching_config"],
        "psnr_mean": r["psnr_mean"],
        "ssim_mean": r["ssim_mean"],
        "load_average_after": list(os.getloadavg()),
    }


def subprocess_run(images: list[str], config: str, iterations: int, seed: int) -> dict[str, Any]:
    from bench import peer

    cmd = [sys.executable, "-m", "bench.trainbn", "one", ",".join(images), config, str(iterations), str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per run, gradleak's and breaching's alike
    if config == PEER:
        env["PYTHONPATH"] = os.pathsep.join([str(peer.PEER_DIR), env.get("PYTHONPATH", ""), str(ROOT)])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and means of mean PSNR per (batch, image set, iterations, config); each config minus
    `before` at the same iterations on the same images, as a difference of the groups' medians."""
    out: dict[str, Any] = {}
    groups: dict[tuple[int, str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((len(r["images"]), r["set"], r["iterations"], r["config"]), []).append(r)
    for (n, image_set, its, config), rs in sorted(groups.items()):
        psnrs = [r["psnr_mean"] for r in rs]
        out[f"b{n}/{image_set}/{its} iterations/{config}"] = {
            "runs": len(rs),
            "psnr_mean_median": statistics.median(psnrs),
            "psnr_mean_mean": statistics.fmean(psnrs),
            "ssim_mean_median": statistics.median(r["ssim_mean"] for r in rs),
            "images": sorted({",".join(r["images"]) for r in rs}),
        }
    for key in list(out):
        head, config = key.rsplit("/", 1)
        before = out.get(f"{head}/before")
        if config != "before" and before and before["images"] == out[key]["images"]:
            out[key]["gain_db_median"] = out[key]["psnr_mean_median"] - before["psnr_mean_median"]
    return out


def _frame_left(grid: Any) -> int:
    pixels = grid.load()
    for x in range(grid.width):
        if any(pixels[x, y][0] > 150 and pixels[x, y][1] < 80 for y in range(grid.height)):
            return max(x - 4, 0)
    return 0


def figure(config: str, seed: int, images: list[str]) -> Path:
    """The runs' own report grids (client's image above, reconstruction below, with their scores),
    side by side: bench/results/attacks-cpu-trainbn-<config>.png. The grids are the artifacts the
    runs left in the benchmark's scratch store, so the runs come first."""
    from PIL import Image

    store = Path(os.environ.get("TMPDIR", "/tmp")) / "gradleak-bench" / "bench"
    paths = [store / f"trainbn-{config}-{name}-{seed}" / "grid.png" for name in images]
    grids = [Image.open(p).convert("RGB") for p in paths]
    # the row labels once: later grids start at their frame (the first strongly red column)
    grids = grids[:1] + [g.crop((_frame_left(g), 0, g.width, g.height)) for g in grids[1:]]
    out = Image.new("RGB", (sum(g.width for g in grids), max(g.height for g in grids)), "white")
    x = 0
    for g in grids:
        out.paste(g, (x, 0))
        x += g.width
    path = RESULTS / f"attacks-cpu-trainbn-{config}.png"
    out.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "one", "figure"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--batch1-tuning", default=",".join(TUNING[:2]))
    ap.add_argument("--batch1-held-out", default=",".join(HELD_OUT[:2]))
    ap.add_argument("--batch4-tuning", default=",".join(TUNING))
    ap.add_argument("--batch4-held-out", default=",".join(HELD_OUT[:4]))
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join([*CONFIGS, PEER])}")
    ap.add_argument(
        "--append", action="store_true", help="keep the runs already in --out (another day's load)"
    )
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument(
        "--from-logs",
        default=None,
        help="comma-separated stderr logs of earlier runs (one JSON run per line): build the report "
        "from them instead of running",
    )
    ap.add_argument("--note", default="", help="free text kept in the report (how the runs were made)")
    ap.add_argument("--extra", type=Path, default=None, help="a JSON object merged into the report")
    ap.add_argument("--out", type=Path, default=RESULTS / "attacks-cpu-trainbn.json")
    a = ap.parse_args()
    if a.mode == "figure":  # args: config seed image...
        config, seed, *names = a.args
        print(f"wrote {figure(config, int(seed), names)}")
        return
    if a.mode == "one":
        images, config, its, seed = a.args
        one = run_peer_one if config == PEER else lambda i, n, s: run_one(i, config, n, s)
        print(json.dumps(one(images.split(","), int(its), int(seed))))
        return
    configs = a.configs.split(",")
    if unknown := [c for c in configs if c not in (*CONFIGS, PEER)]:
        ap.error(f"unknown --configs {', '.join(unknown)}; valid: {', '.join([*CONFIGS, PEER])}")
    if PEER in configs:
        from bench import peer

        if not peer.available():
            ap.error("breaching is not installed: run `make bench-peer`")

    plan: list[tuple[str, list[str]]] = []
    for image_set, names in (("tuning", a.batch1_tuning), ("held_out", a.batch1_held_out)):
        plan += [(image_set, [name]) for name in names.split(",") if name]
    for image_set, names in (("tuning", a.batch4_tuning), ("held_out", a.batch4_held_out)):
        if names:
            plan.append((image_set, names.split(",")))
    jobs = [
        (s, imgs, c, seed)
        for s, imgs in plan
        for seed in map(int, a.seeds.split(","))
        for c in configs
        if c != PEER or len(imgs) == 1
    ]
    started = time.time()
    load_before = list(os.getloadavg())

    def work(job: tuple[str, list[str], str, int]) -> dict[str, Any]:
        image_set, images, config, seed = job
        r = subprocess_run(images, config, a.iterations, seed)
        r["set"] = image_set
        print(json.dumps(r), file=sys.stderr, flush=True)
        return r

    if a.from_logs:
        rows = [
            json.loads(line)
            for log in a.from_logs.split(",")
            for line in Path(log).read_text().splitlines()
            if line.startswith("{")
        ]
    else:
        with ThreadPoolExecutor(max_workers=a.parallel) as pool:
            rows = list(pool.map(work, jobs))
    for r in rows if not a.from_logs else []:  # runs from logs: the report's note says how
        r.setdefault("command", "python -m bench.trainbn " + " ".join(sys.argv[1:]))
    commands = ["python -m bench.trainbn " + " ".join(sys.argv[1:])]
    kept: dict[str, Any] = {}
    if a.append and a.out.exists():
        old = json.loads(a.out.read_text())
        rows = old["runs"] + rows
        commands = old["commands"] + commands
        kept = {k: v for k, v in old.items() if k not in ("summary", "runs", "iterations", "commands")}
    report = {
        "machine": {
            **machine(),
            "note": "a 2-core machine shared with other work; wall-clock figures are noisy",
        },
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": time.time() - started,
        "case": "ResNet-18 (CIFAR stem), 32x32, untrained, FedSGD, labels known, client BN in train mode",
        "configs": CONFIGS,
        "iterations": sorted({r["iterations"] for r in rows}),
        "parallel_runs": None if a.from_logs else a.parallel,
        "tuning_images": TUNING,
        "commands": commands,
        "note": " ".join(n for n in (kept.pop("note", ""), a.note) if n),  # appended runs keep the old note
        "summary": summarise(rows),
        "runs": rows,
    }
    for key, value in kept.items():  # what this run does not make again (probes, notes, ...)
        report.setdefault(key, value)
    if a.extra is not None:
        report.update(json.loads(a.extra.read_text()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
